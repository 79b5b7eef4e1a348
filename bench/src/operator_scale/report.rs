//! The markdown report: the run's context, one table of figures, the targets.

use std::fmt::Write as _;
use std::time::Duration;

use super::cluster::mib;
use super::kek::Provider;
use super::revoke::RevokeFigure;
use super::{Figures, Options};

/// Issue targets: every ApiKey reconciled after a cold start within this, with a peak
/// RSS under [`COLD_START_RSS`].
const COLD_START_TIME: Duration = Duration::from_secs(60);
const COLD_START_RSS: u64 = 256 * 1024 * 1024;
/// The ApiKey CRD's promise: "A revoked key is refused everywhere within a second".
const REVOCATION: Duration = Duration::from_secs(1);

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "not reached (time cap)".to_owned(), secs)
}

/// Per second, e.g. `163/s` or `1.4/s`.
fn rate(n: usize, d: Duration) -> String {
    let r = n as f64 / d.as_secs_f64().max(f64::EPSILON);
    if r < 10.0 {
        format!("{r:.1}/s")
    } else {
        format!("{r:.0}/s")
    }
}

fn status(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}

pub fn render(options: &Options, f: &Figures, load_before: &str, took: Duration) -> String {
    let mut out = String::new();
    let command: Vec<String> = std::env::args().collect();
    let _ = writeln!(out, "Command: `{}`", command.join(" "));
    let _ = writeln!(
        out,
        "Machine: {} cores, {}; load average before {load_before} / after {}; run took {}",
        crate::procfs::processors(),
        crate::procfs::cpu_model(),
        crate::procfs::load_average(),
        secs(took)
    );
    let _ = writeln!(
        out,
        "envtest kube-apiserver 1.20 + etcd on loopback, the operator binary as a child process \
         (RUST_LOG=info, --key-hash-cost {}), client concurrency {}",
        options.key_hash_cost, options.concurrency
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "| figure | measured | target | status |");
    let _ = writeln!(out, "|---|---|---|---|");
    let mut row = |figure: String, measured: String, target: &str, state: &str| {
        let _ = writeln!(out, "| {figure} | {measured} | {target} | {state} |");
    };
    if let Some(k) = &f.keys {
        row(
            format!("{} ApiKeys created ({} namespaces)", k.keys, k.namespaces),
            format!("{} ({})", secs(k.created), rate(k.keys, k.created)),
            "",
            "",
        );
        row(
            format!(
                "issued at bcrypt cost {}: first create → all Active",
                k.hash_cost
            ),
            match k.issued {
                Some(t) => format!(
                    "{} ({}); {} reconciles, {} failed; peak RSS {} MiB",
                    secs(t),
                    rate(k.keys, t),
                    k.issue_reconciles,
                    k.issue_failures,
                    mib(k.issuer_peak)
                ),
                None => "not reached (time cap)".into(),
            },
            "",
            "",
        );
        if let Some(c) = &k.cold {
            let reconciled = c.settled.is_some_and(|t| t < COLD_START_TIME);
            let memory = c.peak_rss < COLD_START_RSS;
            row(
                "cold start: previous operator stopped (SIGTERM, Lease released)".into(),
                secs(c.stop),
                "",
                "",
            );
            row(
                "cold start: spawn → webhooks + identity serving / leader / all keys in policy"
                    .into(),
                format!(
                    "{} / {} / {}",
                    secs(c.serving),
                    opt_secs(c.leader),
                    opt_secs(c.all_in_policy)
                ),
                "",
                "",
            );
            row(
                format!(
                    "**cold start: spawn → every ApiKey reconciled** ({} keys)",
                    k.keys
                ),
                format!(
                    "{} (counter reached {} at {}; {} reconciles, {} failed, {:.1} s summed inside reconcile)",
                    opt_secs(c.settled),
                    k.keys,
                    opt_secs(c.reached_n),
                    c.reconciles,
                    c.failures,
                    c.reconcile_seconds
                ),
                "< 60 s",
                status(reconciled),
            );
            row(
                "**cold start: operator peak RSS (VmHWM)**".into(),
                format!("{} MiB", mib(c.peak_rss)),
                "< 256 MiB",
                status(memory),
            );
            row(
                "cold start: RSS settled / CPU used / keys rewritten".into(),
                format!(
                    "{} MiB / {:.1} s / {} of {}",
                    mib(c.settled_rss),
                    c.cpu_seconds,
                    c.rewritten,
                    k.keys
                ),
                "",
                "",
            );
        }
    }
    let labelled = f.tenants.len() > 1 || f.tenants.iter().any(|(p, _)| *p != Provider::Secret);
    for (provider, t) in &f.tenants {
        let label = if labelled {
            format!(", KEK {}", provider.name())
        } else {
            String::new()
        };
        row(
            format!(
                "{} Tenants (a namespace each){label}: first create → all Ready",
                t.tenants
            ),
            match t.ready {
                Some(ready) => format!(
                    "{} ({}; creating the namespaces took {}, the Tenants {}); {} reconciles, {} failed",
                    secs(ready),
                    rate(t.tenants, ready),
                    secs(t.namespaces_created),
                    secs(t.created),
                    t.reconciles,
                    t.failures
                ),
                None => format!(
                    "{} of {} Ready {} after the first create (time cap; creating the Tenants took {}); {} reconciles, {} failed",
                    t.ready_count,
                    t.tenants,
                    secs(t.waited),
                    secs(t.created),
                    t.reconciles,
                    t.failures
                ),
            },
            "",
            "",
        );
        row(
            format!(
                "{} Tenants{label}: Role reconciles / API server requests",
                t.tenants
            ),
            format!("{} / {}", t.role_reconciles, t.api_requests.summary(8)),
            "",
            "",
        );
        row(
            format!(
                "{} Tenants{label}: operator RSS peak / settled, CPU",
                t.tenants
            ),
            format!(
                "{} / {} MiB, {:.1} s",
                mib(t.peak_rss),
                mib(t.settled_rss),
                t.cpu_seconds
            ),
            "",
            "",
        );
    }
    let baseline = f.tenants.iter().find(|(p, _)| *p == Provider::Secret);
    for (provider, t) in f.tenants.iter().filter(|(p, _)| *p != Provider::Secret) {
        let Some((_, base)) = baseline else { break };
        let ratio = |a: f64, b: f64| format!("{:.2}×", a / b.max(f64::EPSILON));
        row(
            format!(
                "{} Tenants, KEK {} ÷ KEK secret: all Ready / operator CPU",
                t.tenants,
                provider.name()
            ),
            match (t.ready, base.ready) {
                (Some(a), Some(b)) => format!(
                    "{} / {}",
                    ratio(a.as_secs_f64(), b.as_secs_f64()),
                    ratio(t.cpu_seconds, base.cpu_seconds)
                ),
                _ => "not comparable (a run hit the time cap)".to_owned(),
            },
            "",
            "",
        );
    }
    if let Some(c) = &f.certs {
        row(
            format!(
                "{} pods created (injector webhook) / bound tokens + keys",
                c.pods
            ),
            format!("{} / {}", secs(c.pods_created), secs(c.tokens)),
            "",
            "",
        );
        row(
            format!(
                "**{} workload certificates issued** ({} at a time)",
                c.pods, c.concurrency
            ),
            format!(
                "{} issued, {} errors in {:.2} s ({}); latency p50 {} ms, p99 {} ms, max {} ms; operator CPU {:.1} s",
                c.issued,
                c.errors,
                c.issue_wall.as_secs_f64(),
                rate(c.issued, c.issue_wall),
                c.p50.as_millis(),
                c.p99.as_millis(),
                c.max.as_millis(),
                c.operator_cpu
            ),
            "",
            "",
        );
    }
    if let Some(r) = &f.revoke {
        let p50 = RevokeFigure::quantile(&r.latencies, 0.5);
        let max = r.latencies.last().copied().unwrap_or_default();
        row(
            format!(
                "**revocation: PATCH spec.revoked → verifier refuses** ({} keys, bundle of {})",
                r.latencies.len(),
                r.bundle_keys
            ),
            format!(
                "p50 {} ms, max {} ms (the PATCH call alone: p50 {} ms)",
                p50.as_millis(),
                max.as_millis(),
                RevokeFigure::quantile(&r.patch_calls, 0.5).as_millis()
            ),
            "< 1 s (ApiKey CRD doc)",
            status(!r.latencies.is_empty() && max < REVOCATION && r.anomalies.is_empty()),
        );
    }
    if let Some(c) = &f.certs
        && let Some(e) = &c.first_error
    {
        f_note(&mut out, &format!("first certificate error: {e}"));
    }
    if let Some(r) = &f.revoke {
        for a in &r.anomalies {
            f_note(&mut out, &format!("revocation: {a}"));
        }
    }
    for note in &f.notes {
        f_note(&mut out, note);
    }
    out
}

fn f_note(out: &mut String, note: &str) {
    let _ = writeln!(out, "\nNote: {note}");
}
