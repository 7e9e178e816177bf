//! Parsing event time from what real sensors write.
//!
//! Zeek JSON writes epoch seconds with microseconds (`1521910980.123456`) or
//! RFC 3339 with `Z`; Suricata writes `2018-03-24T12:34:56.123456-0600`
//! (offset without a colon) or no zone at all; other producers write epoch
//! milliseconds or microseconds. [`TimeFormat::Auto`] accepts all of these;
//! the explicit formats reject anything else, which catches a misconfigured
//! field early. A value without a zone is taken as UTC.
//!
//! Values arrive as a string column (the JSON decoder coerces numbers to
//! strings for timestamp fields), and come out as milliseconds since the
//! epoch, with nulls where a value is missing or cannot be parsed; the caller
//! decides what a null means (for event time: a dead letter).

use arrow::array::{Array, AsArray, TimestampMillisecondArray, TimestampMillisecondBuilder};
use arrow::datatypes::DataType;
use chrono::{DateTime, NaiveDateTime};
use serde::Deserialize;

/// How an event-time value is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// Any of the formats below, told apart by shape and magnitude.
    #[default]
    Auto,
    /// RFC 3339 / ISO 8601, with or without zone (`Z`, `+01:00`, `-0600`).
    Rfc3339,
    /// Seconds since the epoch, fractions allowed.
    EpochS,
    /// Milliseconds since the epoch.
    EpochMs,
    /// Microseconds since the epoch.
    EpochUs,
}

impl TimeFormat {
    /// Names accepted in pipeline files.
    pub const NAMES: &'static [&'static str] =
        &["auto", "rfc3339", "epoch_s", "epoch_ms", "epoch_us"];
}

/// Parses one value to milliseconds since the epoch.
pub fn parse(value: &str, format: TimeFormat) -> Option<i64> {
    let v = value.trim();
    match format {
        TimeFormat::Rfc3339 => parse_datetime(v),
        TimeFormat::EpochS => v.parse::<f64>().ok().map(|s| (s * 1e3).floor() as i64),
        TimeFormat::EpochMs => parse_epoch_scaled(v, 1.0),
        TimeFormat::EpochUs => parse_epoch_scaled(v, 1e-3),
        TimeFormat::Auto => {
            if v.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_digit() || b == b'-')
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
            {
                if let Ok(n) = v.parse::<f64>() {
                    let a = n.abs();
                    return Some(if a < 1e11 {
                        (n * 1e3).floor() as i64
                    } else if a < 1e14 {
                        n.floor() as i64
                    } else {
                        (n / 1e3).floor() as i64
                    });
                }
            }
            parse_datetime(v)
        }
    }
}

fn parse_epoch_scaled(v: &str, to_ms: f64) -> Option<i64> {
    if let Ok(i) = v.parse::<i64>() {
        return Some(if to_ms == 1.0 {
            i
        } else {
            (i as f64 * to_ms).floor() as i64
        });
    }
    v.parse::<f64>().ok().map(|f| (f * to_ms).floor() as i64)
}

fn parse_datetime(v: &str) -> Option<i64> {
    if let Ok(d) = DateTime::parse_from_rfc3339(v) {
        return Some(d.timestamp_millis());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(d) = DateTime::parse_from_str(v, fmt) {
            return Some(d.timestamp_millis());
        }
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(d) = NaiveDateTime::parse_from_str(v, fmt) {
            return Some(d.and_utc().timestamp_millis());
        }
    }
    None
}

/// Parses a column of raw values. Returns the timestamps (null where missing
/// or unparsable) and, per row, whether a non-null value failed to parse.
pub fn parse_column(
    array: &dyn Array,
    format: TimeFormat,
) -> (TimestampMillisecondArray, Vec<bool>) {
    let n = array.len();
    let mut out = TimestampMillisecondBuilder::with_capacity(n);
    let mut failed = vec![false; n];
    match array.data_type() {
        DataType::Utf8 => {
            let s = array.as_string::<i32>();
            for (i, v) in s.iter().enumerate() {
                match v {
                    None => out.append_null(),
                    Some(v) => match parse(v, format) {
                        Some(ms) => out.append_value(ms),
                        None => {
                            failed[i] = true;
                            out.append_null();
                        }
                    },
                }
            }
        }
        _ => {
            for f in failed.iter_mut() {
                *f = true;
                out.append_null();
            }
        }
    }
    (out.finish().with_timezone("UTC"), failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_521_911_799_739; // 2018-03-24T17:16:39.739Z

    #[test]
    fn accepts_what_zeek_and_suricata_write() {
        let f = TimeFormat::Auto;
        assert_eq!(parse("2018-03-24T17:16:39.739898Z", f), Some(T));
        assert_eq!(parse("1521911799.739898", f), Some(T));
        assert_eq!(parse("1521911799739", f), Some(T));
        assert_eq!(parse("1521911799739898", f), Some(T));
        assert_eq!(parse("2018-03-24T11:16:39.739898-0600", f), Some(T));
        assert_eq!(parse("2018-03-24T11:16:39.739898-06:00", f), Some(T));
        assert_eq!(
            parse("2018-03-24T17:16:39.739898", f),
            Some(T),
            "no zone: UTC"
        );
        assert_eq!(parse("2018-03-24 17:16:39.739", f), Some(T));
    }

    #[test]
    fn explicit_formats_reject_other_shapes() {
        assert_eq!(parse("1521911799.739898", TimeFormat::Rfc3339), None);
        assert_eq!(parse("2018-03-24T17:16:39Z", TimeFormat::EpochS), None);
        assert_eq!(parse("1521911799739", TimeFormat::EpochMs), Some(T));
        assert_eq!(parse("1521911799739898", TimeFormat::EpochUs), Some(T));
        assert_eq!(parse("yesterday", TimeFormat::Auto), None);
        assert_eq!(parse("", TimeFormat::Auto), None);
    }

    #[test]
    fn column_marks_unparsable_values_but_not_missing_ones() {
        let a =
            arrow::array::StringArray::from(vec![Some("1521911799.739898"), None, Some("nope")]);
        let (ts, failed) = parse_column(&a, TimeFormat::Auto);
        assert_eq!(ts.value(0), T);
        assert!(ts.is_null(1) && ts.is_null(2));
        assert_eq!(failed, vec![false, false, true]);
    }
}
