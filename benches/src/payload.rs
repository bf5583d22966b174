//! The simulated devices' payload: a 2/DCP JSON batch of one sample that carries its send time,
//! step and run id, padded to an exact size, e.g.
//! `[{"t":1732000000123456789,"s":2,"r":"3f9a1c2b","p":"xxxxxxxx"}]`.
//!
//! `t` is the send time in Unix nanoseconds (the receiver is on the same machine, so the same
//! clock), `s` the index of the step it was sent in, `r` the run id (so that the delivery
//! counter of one run does not count another run's messages on the same NATS server), `p`
//! padding. Writing and parsing are hand-rolled: they run once per message on the generator's
//! hot path.

/// `[{"t":`, `,"s":`, `,"r":"`, `","p":"` and `"}]` around the fields.
const PREFIX: &[u8] = b"[{\"t\":";
const STEP: &[u8] = b",\"s\":";
const RUN: &[u8] = b",\"r\":\"";
const PAD: &[u8] = b"\",\"p\":\"";
const SUFFIX: &[u8] = b"\"}]";

/// The longest run id, bytes.
pub const MAX_RUN_ID_LEN: usize = 8;
/// Steps a run may have, at most (their index must fit [`MIN_PAYLOAD_BYTES`]).
pub const MAX_STEPS: usize = 100_000;

/// The smallest payload size every message fits in: 20 digits of time, 5 of step (fewer than
/// [`MAX_STEPS`] steps) and the longest run id.
pub const MIN_PAYLOAD_BYTES: usize =
    PREFIX.len() + 20 + STEP.len() + 5 + RUN.len() + MAX_RUN_ID_LEN + PAD.len() + SUFFIX.len();

/// Whether `id` can be a run id: 1 to [`MAX_RUN_ID_LEN`] ASCII letters, digits, `-` or `_`
/// (nothing that needs escaping in JSON).
pub fn valid_run_id(id: &str) -> bool {
    (1..=MAX_RUN_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh run id: 8 hex digits from the time and the process id.
pub fn new_run_id() -> String {
    let t = crate::stats::unix_nanos();
    let mut h =
        (t ^ (t >> 29) ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 31;
    format!("{:08x}", h as u32)
}

/// What a payload written by [`write`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp<'a> {
    /// Send time, Unix nanoseconds.
    pub sent_unix_nanos: u64,
    /// The step it was sent in.
    pub step: u32,
    /// The run that sent it.
    pub run_id: &'a [u8],
}

/// Replaces `out` with a payload of `size` bytes (more only when `size` is below what the
/// fields need; [`MIN_PAYLOAD_BYTES`] always suffices with a valid run id).
pub fn write(out: &mut Vec<u8>, sent_unix_nanos: u64, step: u32, run_id: &[u8], size: usize) {
    out.clear();
    out.extend_from_slice(PREFIX);
    push_decimal(out, sent_unix_nanos);
    out.extend_from_slice(STEP);
    push_decimal(out, u64::from(step));
    out.extend_from_slice(RUN);
    out.extend_from_slice(run_id);
    out.extend_from_slice(PAD);
    let fill = size.saturating_sub(out.len() + SUFFIX.len());
    out.resize(out.len() + fill, b'x');
    out.extend_from_slice(SUFFIX);
}

/// The send time, step and run id of a payload written by [`write`]; `None` for anything else.
pub fn parse(payload: &[u8]) -> Option<Stamp<'_>> {
    let rest = payload.strip_prefix(PREFIX)?;
    let (t, rest) = take_decimal(rest)?;
    let rest = rest.strip_prefix(STEP)?;
    let (s, rest) = take_decimal(rest)?;
    let rest = rest.strip_prefix(RUN)?;
    let n = rest.iter().take(MAX_RUN_ID_LEN + 1).take_while(|b| **b != b'"').count();
    if n == 0 || n > MAX_RUN_ID_LEN {
        return None;
    }
    let (run_id, rest) = rest.split_at(n);
    rest.strip_prefix(PAD)?;
    Some(Stamp { sent_unix_nanos: t, step: u32::try_from(s).ok()?, run_id })
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
        write(&mut buf, 1_732_000_000_123_456_789, 3, b"3f9a1c2b", 64);
        assert_eq!(buf.len(), 64);
        let stamp =
            Stamp { sent_unix_nanos: 1_732_000_000_123_456_789, step: 3, run_id: b"3f9a1c2b" };
        assert_eq!(parse(&buf), Some(stamp));
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("valid JSON");
        assert_eq!(v[0]["t"], serde_json::json!(1_732_000_000_123_456_789u64));
        assert_eq!(v[0]["s"], 3);
        assert_eq!(v[0]["r"], "3f9a1c2b");
        const { assert!(MIN_PAYLOAD_BYTES <= 64, "the default payload size holds every field") };
    }

    #[test]
    fn extremes_fit_in_the_minimum_size() {
        let mut buf = Vec::new();
        let last_step = (MAX_STEPS - 1) as u32;
        write(&mut buf, u64::MAX, last_step, b"abcdefgh", MIN_PAYLOAD_BYTES);
        assert_eq!(buf.len(), MIN_PAYLOAD_BYTES);
        let p = parse(&buf).expect("parses");
        assert_eq!((p.sent_unix_nanos, p.step, p.run_id), (u64::MAX, last_step, &b"abcdefgh"[..]));
        write(&mut buf, 0, 0, b"a", 0);
        assert_eq!(parse(&buf).map(|p| (p.sent_unix_nanos, p.step)), Some((0, 0)));
        write(&mut buf, 7, 1, b"x-_9", 4096);
        assert_eq!(buf.len(), 4096);
        assert_eq!(parse(&buf).map(|p| (p.step, p.run_id)), Some((1, &b"x-_9"[..])));
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
            b"[{\"t\":1,\"s\":1,\"p\":\"\"}]",
            b"[{\"t\":1,\"s\":1,\"r\":\"\",\"p\":\"\"}]",
            b"[{\"t\":1,\"s\":1,\"r\":\"123456789\",\"p\":\"\"}]",
            b"[{\"t\":1,\"s\":1,\"r\":\"ab",
        ] {
            assert_eq!(parse(p), None, "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn run_ids() {
        let id = new_run_id();
        assert!(valid_run_id(&id) && id.len() == 8, "{id}");
        for bad in ["", "123456789", "a\"b", "a b", "é"] {
            assert!(!valid_run_id(bad), "{bad:?}");
        }
    }
}
