//! Checking configuration values against the limits their types do not express; the binary
//! refuses to start (naming the setting) on any problem a section reports.

/// The settings among `minimums` — `(key, value, minimum)` — whose value is below its
/// minimum, as `(key, what is wrong)`.
pub fn below_minimum(minimums: &[(&'static str, u64, u64)]) -> Vec<(&'static str, String)> {
    minimums
        .iter()
        .filter(|(_, value, min)| value < min)
        .map(|&(key, value, min)| (key, format!("{value} is too small: the minimum is {min}")))
        .collect()
}

/// `(key, what is wrong)` when `value` is above `max`.
pub fn above_maximum(key: &'static str, value: u64, max: u64) -> Option<(&'static str, String)> {
    (value > max).then(|| (key, format!("{value} is too large: the maximum is {max}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_values_out_of_range_are_reported() {
        let found = below_minimum(&[("a", 0, 1), ("b", 1, 1), ("c", 63, 64)]);
        assert_eq!(
            found,
            [
                ("a", "0 is too small: the minimum is 1".to_owned()),
                ("c", "63 is too small: the minimum is 64".to_owned())
            ]
        );
        assert_eq!(above_maximum("d", 5, 5), None);
        assert!(above_maximum("d", 6, 5).is_some());
    }
}
