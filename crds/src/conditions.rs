//! Kubernetes-style status conditions (`Ready` with reason and message).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition type every Portcullis object reports.
pub const READY: &str = "Ready";

/// Builds a `Ready` condition. `previous` keeps `lastTransitionTime` when the status
/// did not change, as Kubernetes conventions ask.
pub fn ready(
    ready: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    previous: &[Condition],
    now: Time,
) -> Condition {
    condition(READY, ready, reason, message, generation, previous, now)
}

/// Builds a condition of type `type_`; `previous` keeps `lastTransitionTime` when its
/// status did not change.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    previous: &[Condition],
    now: Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The `Ready` condition in a list, if any.
pub fn find_ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == READY)
}

/// Whether the list says `Ready=True`.
pub fn is_ready(conditions: &[Condition]) -> bool {
    find_ready(conditions).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let first = ready(true, "Issued", "ok", Some(1), &[], at(10));
        let again = ready(
            true,
            "Issued",
            "still ok",
            Some(2),
            std::slice::from_ref(&first),
            at(20),
        );
        assert_eq!(again.last_transition_time, at(10));
        assert_eq!(again.observed_generation, Some(2));
        let flipped = ready(false, "Expired", "gone", Some(2), &[again], at(30));
        assert_eq!(flipped.last_transition_time, at(30));
        assert_eq!(flipped.status, "False");
        assert!(!is_ready(std::slice::from_ref(&flipped)));
        assert!(is_ready(&[first]));
        assert_eq!(
            find_ready(&[flipped]).map(|c| c.reason.as_str()),
            Some("Expired")
        );
    }
}
