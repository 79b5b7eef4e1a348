//! The port list of `portcullis.dev/skip-inbound-ports` and the init step's
//! `--skip-inbound-ports`: comma-separated ports or ranges (`22, 8000-8100`). The
//! injector validates the pod annotation with the same parser the init step uses, so a
//! pod is refused at admission rather than crash-looping in its init container.

use std::fmt;
use std::str::FromStr;

/// One port or an inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// A single port.
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// The first port.
    pub fn first(self) -> u16 {
        self.first
    }

    /// The last port (equal to `first` for a single port).
    pub fn last(self) -> u16 {
        self.last
    }

    /// Whether `port` is inside the range.
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The `--dport` argument of iptables: `22` or `8000:8100`.
    pub fn iptables_dport(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Why a port list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not a port or port range (use 1-65535 or first-last, comma-separated)")]
pub struct PortListError {
    /// The entry that did not parse.
    pub entry: String,
}

impl FromStr for PortRange {
    type Err = PortListError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || PortListError {
            entry: text.to_owned(),
        };
        let port = |s: &str| match s.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(error()),
            Ok(p) => Ok(p),
        };
        let range = match text.trim().split_once('-') {
            Some((first, last)) => Self {
                first: port(first)?,
                last: port(last)?,
            },
            None => Self::single(port(text)?),
        };
        if range.first > range.last {
            return Err(error());
        }
        Ok(range)
    }
}

/// A list of ports and ranges, in the order written, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(Vec<PortRange>);

impl PortList {
    /// The entries.
    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any entry contains `port`.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }
}

impl FromStr for PortList {
    type Err = PortListError;

    /// Parses `22, 8000-8100`; empty entries (and an empty string) are allowed.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut ranges: Vec<PortRange> = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let range = entry.parse()?;
            if !ranges.contains(&range) {
                ranges.push(range);
            }
        }
        Ok(Self(ranges))
    }
}

impl fmt::Display for PortList {
    /// The canonical form: `22,8000-8100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_ranges_and_prints_them_canonically() {
        let list: PortList = " 22, 8000-8100,,22 ,9090".parse().unwrap();
        assert_eq!(list.to_string(), "22,8000-8100,9090");
        assert!(list.contains(8050));
        assert!(!list.contains(8101));
        let dports: Vec<_> = list.ranges().iter().map(|r| r.iptables_dport()).collect();
        assert_eq!(dports, ["22", "8000:8100", "9090"]);
        assert!("".parse::<PortList>().unwrap().is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_port() {
        for bad in ["0", "65536", "http", "10-5", "1-2-3", "-5", "22;23"] {
            let err = bad.parse::<PortList>().unwrap_err();
            assert!(err.to_string().contains("is not a port"), "{bad}: {err}");
        }
        assert_eq!("22,x".parse::<PortList>().unwrap_err().entry, "x");
    }
}
