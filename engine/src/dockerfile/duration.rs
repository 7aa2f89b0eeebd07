//! Go's `time.ParseDuration`, which HEALTHCHECK's `--interval`,
//! `--timeout`, `--start-period` and `--start-interval` use.

use std::time::Duration;

use crate::excerpt::excerpt;
/// A duration or interval that cannot be used; the texts are Go's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DurationError {
    #[error("time: invalid duration {:?}", excerpt(.0))]
    Invalid(String),
    #[error("time: missing unit in duration {:?}", excerpt(.0))]
    MissingUnit(String),
    #[error("time: unknown unit {:?} in duration {:?}", excerpt(.unit), excerpt(.text))]
    UnknownUnit { unit: String, text: String },
    /// A HEALTHCHECK interval below one millisecond.
    #[error("Interval \"{}\" cannot be less than 1ms", excerpt(.flag))]
    BelowOneMillisecond { flag: String },
}

/// A signed duration in nanoseconds, as Go parses it.
pub(crate) fn parse_go_duration(text: &str) -> Result<i128, DurationError> {
    let invalid = || DurationError::Invalid(text.to_string());
    let (neg, mut s) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        if !(s.starts_with('.') || s.starts_with(|c: char| c.is_ascii_digit())) {
            return Err(invalid());
        }
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let nanos: i128 = match unit {
            "" => return Err(DurationError::MissingUnit(text.to_string())),
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(DurationError::UnknownUnit {
                    unit: other.to_string(),
                    text: text.to_string(),
                })
            }
        };
        let whole: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = whole.checked_mul(nanos).ok_or_else(invalid)?;
        // The fraction, truncated to nanoseconds as Go does.
        let mut scale: i128 = 1;
        let mut frac: i128 = 0;
        for d in frac_part.bytes().take(30) {
            frac = frac * 10 + i128::from(d - b'0');
            scale *= 10;
        }
        value += frac * nanos / scale;
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > i128::from(i64::MAX) {
            return Err(invalid());
        }
    }
    Ok(if neg { -total } else { total })
}

/// A HEALTHCHECK interval: empty or zero means "not set"; anything below
/// one millisecond (including negative values) is refused, as BuildKit
/// does.
pub(crate) fn parse_interval(flag: &str, text: &str) -> Result<Option<Duration>, DurationError> {
    if text.is_empty() {
        return Ok(None);
    }
    let nanos = parse_go_duration(text)?;
    if nanos == 0 {
        return Ok(None);
    }
    if nanos < 1_000_000 {
        return Err(DurationError::BelowOneMillisecond {
            flag: flag.to_string(),
        });
    }
    Ok(Some(Duration::from_nanos(nanos as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s").unwrap(), 30_000_000_000);
        assert_eq!(parse_go_duration("1h2m3.5s").unwrap(), 3_723_500_000_000);
        assert_eq!(parse_go_duration("1.5ms").unwrap(), 1_500_000);
        assert_eq!(parse_go_duration(".5s").unwrap(), 500_000_000);
        assert_eq!(parse_go_duration("-2m").unwrap(), -120_000_000_000);
        assert_eq!(parse_go_duration("0").unwrap(), 0);
        assert_eq!(parse_go_duration("10µs").unwrap(), 10_000);
        assert!(parse_go_duration("5")
            .unwrap_err()
            .to_string()
            .contains("missing unit"));
        assert!(parse_go_duration("5d")
            .unwrap_err()
            .to_string()
            .contains("unknown unit \"d\""));
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("s").is_err());
        assert!(parse_go_duration(".s").is_err());
        assert!(parse_go_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("interval", "").unwrap(), None);
        assert_eq!(parse_interval("interval", "0s").unwrap(), None);
        assert_eq!(
            parse_interval("timeout", "3s").unwrap(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_interval("interval", "500us").unwrap_err().to_string(),
            "Interval \"interval\" cannot be less than 1ms"
        );
        assert!(parse_interval("interval", "-1s").is_err());
    }
}
