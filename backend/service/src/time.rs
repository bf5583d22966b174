//! ISO-8601 timestamps to and from Unix milliseconds: what samples carry and what Kaa's REST
//! API takes and answers (`2019-04-26T15:41:07.123Z`).

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses `YYYY-MM-DD`, optionally followed by `THH:MM[:SS[.fraction]]` and a zone (`Z`,
/// `±HH:MM`, `±HHMM` or `±HH`; none means UTC), into Unix milliseconds. `None` when it is
/// not such a timestamp or names a date or time that does not exist.
pub fn parse_iso8601(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut ms = days_from_civil(year, month, day) * 86_400_000;
    let mut i = 10;
    if i == b.len() {
        return Some(ms);
    }
    if !matches!(b[i], b'T' | b't' | b' ') {
        return None;
    }
    let (hour, minute) = (num(i + 1, 2)?, num(i + 4, 2)?);
    if b.get(i + 3) != Some(&b':') || hour > 23 || minute > 59 {
        return None;
    }
    i += 6;
    let mut second = 0;
    if b.get(i) == Some(&b':') {
        second = num(i + 1, 2)?;
        if second > 60 {
            return None;
        }
        i += 3;
    }
    let mut millis = 0;
    if matches!(b.get(i), Some(b'.' | b',')) {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    ms += (hour * 3600 + minute * 60 + second.min(59)) * 1000 + millis;
    let offset_minutes = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let hours = num(i + 1, 2)?;
            let rest = &b[i + 3..];
            let minutes = match rest {
                [] => 0,
                [b':', ..] if rest.len() == 3 => num(i + 4, 2)?,
                _ if rest.len() == 2 => num(i + 3, 2)?,
                _ => return None,
            };
            if hours > 23 || minutes > 59 {
                return None;
            }
            let m = hours * 60 + minutes;
            if sign == b'+' { m } else { -m }
        }
        _ => return None,
    };
    Some(ms - offset_minutes * 60_000)
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`, the form Kaa's REST API answers.
pub fn format_iso8601(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, rest) = (in_day / 3_600_000, in_day % 3_600_000);
    let (min, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_kaa_and_devices_use() {
        let t = 1_556_293_267_000; // 2019-04-26T15:41:07Z
        assert_eq!(parse_iso8601("2019-04-26T15:41:07Z"), Some(t));
        assert_eq!(parse_iso8601("2019-04-26T15:41:07.123Z"), Some(t + 123));
        assert_eq!(parse_iso8601("2019-04-26T15:41:07.1Z"), Some(t + 100));
        assert_eq!(parse_iso8601("2019-04-26T15:41:07.123456Z"), Some(t + 123));
        assert_eq!(parse_iso8601("2019-04-26T15:41:07+0000"), Some(t));
        assert_eq!(parse_iso8601("2019-04-26T17:41:07+02:00"), Some(t));
        assert_eq!(parse_iso8601("2019-04-26T14:41:07-01"), Some(t));
        assert_eq!(parse_iso8601("2019-04-26T15:41:07"), Some(t));
        assert_eq!(parse_iso8601("2019-04-26T15:41Z"), Some(t - 7000));
        assert_eq!(parse_iso8601("2019-04-26"), Some(1_556_236_800_000));
        assert_eq!(parse_iso8601("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_iso8601("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(parse_iso8601("2024-02-29T00:00:00Z"), Some(1_709_164_800_000));
    }

    #[test]
    fn refuses_what_is_not_a_timestamp() {
        for bad in [
            "",
            "yesterday",
            "2019-04-26T",
            "2019-13-01T00:00:00Z",
            "2019-02-29T00:00:00Z",
            "2019-04-26T24:00:00Z",
            "2019-04-26T15:41:07.Z",
            "2019-04-26T15:41:07Zjunk",
            "2019-04-26T15:41:07+2",
            "2019/04/26",
            "1556293267000",
        ] {
            assert_eq!(parse_iso8601(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for ms in [0, -1, 1_556_293_267_123, 951_782_400_000, 253_402_300_799_999] {
            assert_eq!(parse_iso8601(&format_iso8601(ms)), Some(ms), "{ms}");
        }
        assert_eq!(format_iso8601(1_556_293_267_123), "2019-04-26T15:41:07.123Z");
    }
}
