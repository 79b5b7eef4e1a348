//! `collector`: how many records one collector core ingests, checked on arrival and made
//! durable, against the proxy's audited request rate per core.
//!
//! Several proxies' chains (records with a signed checkpoint every 1000) are made first,
//! untimed; then one thread feeds them to a [`Collector`] over a real directory in
//! batches of `batch` lines, chains interleaved, each batch checked (every record's hash
//! recomputed, every link and checkpoint signature verified) and fsynced before the next.

use std::sync::Arc;
use std::time::Instant;

use portcullis_audit::checkpoint::{CheckpointSigner, SignerIdentity};
use portcullis_audit::entry::Entry;
use portcullis_audit::{AuditRecord, Chain};
use portcullis_collector::{Collector, FileStore, Sender};

/// What to measure.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Records in all (split over the chains).
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Lines per shipped batch (the proxy's spooled sink sends its writer's batches).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Proxies shipping at once (one chain each).
    #[arg(long, default_value_t = 4)]
    chains: usize,
}

const TENANT: &str = "bench";
const WORKLOAD: &str = "spiffe://cluster.local/ns/bench/sa/web";

/// One proxy's chain as the lines it ships.
fn chain_lines(index: usize, records: usize) -> anyhow::Result<Vec<String>> {
    let mut chain = Chain::new(format!("web-{index}-bench"));
    let signer = CheckpointSigner::from_pkcs8(
        &CheckpointSigner::generate_pkcs8()?,
        SignerIdentity::default(),
    )?;
    let now = jiff::Timestamp::now();
    let mut lines = Vec::with_capacity(records + records / 1000 + 1);
    for i in 0..records {
        let mut record = AuditRecord::new(now, TENANT, "web-7d9f", "api.events", "key:ak_***7f2");
        record.method = "POST".into();
        record.path = format!("/v1/events/{i}");
        record.status = 200;
        let record = chain.append(record)?;
        let (seq, hash) = (record.seq, record.hash.clone());
        lines.push(Entry::Record(record).to_json_line()?);
        if (i + 1) % 1000 == 0 {
            let checkpoint = signer.sign(chain.id(), seq, &hash, now)?;
            lines.push(Entry::Checkpoint(checkpoint).to_json_line()?);
        }
    }
    Ok(lines)
}

/// Runs the measurement and prints one table.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let chains = options.chains.max(1);
    let per_chain = options.records.div_ceil(chains);
    let made = Instant::now();
    let chains: Vec<Vec<String>> = (0..chains)
        .map(|i| chain_lines(i, per_chain))
        .collect::<anyhow::Result<_>>()?;
    println!(
        "made {} chains of {per_chain} records in {:.1} s (untimed)",
        chains.len(),
        made.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    // Stored days are sealed under the tenant's key, as in a cluster.
    let keys = portcullis_collector::KeyCache::new();
    keys.insert(portcullis_audit::TenantKeys::generate(TENANT));
    let mut collector = Collector::open(
        FileStore::open(dir.path(), Arc::new(keys))?,
        Arc::new(portcullis_api::clock::SystemClock),
    )?;
    let sender = Sender {
        tenant: TENANT,
        workload: WORKLOAD,
    };
    let batch = options.batch.max(1);
    let (mut records, mut entries, mut batches) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let longest = chains.iter().map(Vec::len).max().unwrap_or(0);
    let mut offset = 0;
    while offset < longest {
        for lines in &chains {
            let Some(slice) = lines.get(offset..(offset + batch).min(lines.len())) else {
                continue;
            };
            if slice.is_empty() {
                continue;
            }
            let body: String = slice.iter().map(|l| format!("{l}\n")).collect();
            let ingested = collector
                .ingest_counted(sender, &body)
                .map_err(|e| anyhow::anyhow!("batch refused: {e}"))?;
            records += ingested.records;
            entries += ingested.ack.stored;
            batches += 1;
        }
        offset += batch;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| records ingested, checked, encrypted and fsynced | {records} ({entries} entries incl. checkpoints) |"
    );
    println!("| batches of {batch} lines | {batches} |");
    println!(
        "| one core | {:.0} records/s, {:.0} batches/s |",
        records as f64 / seconds,
        batches as f64 / seconds
    );
    Ok(())
}
