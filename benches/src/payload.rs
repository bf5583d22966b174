//! The simulated devices' payload: a 2/DCP JSON batch of one sample that carries its send time
//! and step, padded to an exact size, e.g. `[{"t":1732000000123456789,"s":2,"p":"xxxxxxxx"}]`.
//!
//! `t` is the send time in Unix nanoseconds (the receiver is on the same machine, so the same
//! clock), `s` the index of the step it was sent in, `p` padding. Writing and parsing are
//! hand-rolled: they run once per message on the generator's hot path.

/// `[{"t":`, `,"s":`, `,"p":"` and `"}]` around the numbers.
const PREFIX: &[u8] = b"[{\"t\":";
const STEP: &[u8] = b",\"s\":";
const PAD: &[u8] = b",\"p\":\"";
const SUFFIX: &[u8] = b"\"}]";

/// The smallest payload size every message fits in: 20 digits of time and 10 of step.
pub const MIN_PAYLOAD_BYTES: usize = PREFIX.len() + 20 + STEP.len() + 10 + PAD.len() + SUFFIX.len();

/// Replaces `out` with a payload of `size` bytes (more only when `size` is below what the two
/// numbers need; [`MIN_PAYLOAD_BYTES`] always suffices).
pub fn write(out: &mut Vec<u8>, sent_unix_nanos: u64, step: u32, size: usize) {
    out.clear();
    out.extend_from_slice(PREFIX);
    push_decimal(out, sent_unix_nanos);
    out.extend_from_slice(STEP);
    push_decimal(out, u64::from(step));
    out.extend_from_slice(PAD);
    let fill = size.saturating_sub(out.len() + SUFFIX.len());
    out.resize(out.len() + fill, b'x');
    out.extend_from_slice(SUFFIX);
}

/// The send time (Unix nanoseconds) and step of a payload written by [`write`]; `None` for
/// anything else.
pub fn parse(payload: &[u8]) -> Option<(u64, u32)> {
    let rest = payload.strip_prefix(PREFIX)?;
    let (t, rest) = take_decimal(rest)?;
    let rest = rest.strip_prefix(STEP)?;
    let (s, rest) = take_decimal(rest)?;
    rest.strip_prefix(PAD)?;
    Some((t, u32::try_from(s).ok()?))
}

fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn take_decimal(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in &s[..n] {
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((v, &s[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_exact_size_and_is_json() {
        let mut buf = Vec::new();
        write(&mut buf, 1_732_000_000_123_456_789, 3, 64);
        assert_eq!(buf.len(), 64);
        assert_eq!(parse(&buf), Some((1_732_000_000_123_456_789, 3)));
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("valid JSON");
        assert_eq!(v[0]["t"], serde_json::json!(1_732_000_000_123_456_789u64));
        assert_eq!(v[0]["s"], 3);
    }

    #[test]
    fn extremes_fit_in_the_minimum_size() {
        let mut buf = Vec::new();
        write(&mut buf, u64::MAX, u32::MAX, MIN_PAYLOAD_BYTES);
        assert_eq!(buf.len(), MIN_PAYLOAD_BYTES);
        assert_eq!(parse(&buf), Some((u64::MAX, u32::MAX)));
        write(&mut buf, 0, 0, 0);
        assert_eq!(parse(&buf), Some((0, 0)));
        write(&mut buf, 7, 1, 4096);
        assert_eq!(buf.len(), 4096);
        assert_eq!(parse(&buf), Some((7, 1)));
    }

    #[test]
    fn foreign_payloads_are_rejected() {
        for p in [
            &b""[..],
            b"[{\"temperature\":21}]",
            b"[{\"t\":,\"s\":1,\"p\":\"\"}]",
            b"[{\"t\":123,\"s\":99999999999,\"p\":\"\"}]",
            b"[{\"t\":99999999999999999999999,\"s\":1,\"p\":\"\"}]",
            b"[{\"t\":12",
        ] {
            assert_eq!(parse(p), None, "{}", String::from_utf8_lossy(p));
        }
    }
}
