//! RFC 3339 timestamps for JSON (audit records, API bodies), millisecond integers for the
//! store, and the grant durations the CLI reads.

use std::time::{Duration, SystemTime};

/// `SystemTime` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn to_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The inverse of [`to_millis`].
pub fn from_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A grant or request duration from the command line (`--for`): a humantime duration such
/// as `30m` or `1h 30m`, in whole seconds and at least 1s, as the API counts them. Nothing is
/// rounded: `0s` or `500ms` is an error, never one second.
pub fn parse_grant_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    if d.subsec_nanos() != 0 {
        return Err("must be whole seconds, e.g. 90s or 1m 30s".into());
    }
    Ok(d)
}

/// Serde adapter: `SystemTime` <-> RFC 3339 string.
pub mod serde_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: `Option<SystemTime>` <-> RFC 3339 string or `null`.
pub mod serde_rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => humantime::parse_rfc3339_weak(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_grant_duration;
    use std::time::Duration;

    #[test]
    fn grant_durations_are_whole_seconds_from_one() {
        assert_eq!(parse_grant_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_grant_duration("1s"), Ok(Duration::from_secs(1)));
        for bad in ["0s", "0", "500ms", "1500ms", "soon", ""] {
            assert!(parse_grant_duration(bad).is_err(), "{bad}");
        }
    }
}
