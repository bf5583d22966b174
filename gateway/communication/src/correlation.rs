//! Correlation ids of the requests this replica sends: `<replica id>-<request number in hex>`.

/// A correlation id built on the stack: one per request, so not worth an allocation (unless
/// the replica id is very long).
pub(crate) enum CorrelationId {
    Inline { buf: [u8; 96], len: usize },
    Heap(String),
}

impl CorrelationId {
    /// `<prefix><n in hex>`; `prefix` is `<replica id>-`.
    pub(crate) fn new(prefix: &str, n: u64) -> Self {
        let mut hex = [0u8; 16];
        let mut i = hex.len();
        let mut rest = n;
        loop {
            i -= 1;
            hex[i] = b"0123456789abcdef"[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        let digits = &hex[i..];
        let len = prefix.len() + digits.len();
        let mut buf = [0u8; 96];
        if len > buf.len() {
            return Self::Heap(format!("{prefix}{n:x}"));
        }
        buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
        buf[prefix.len()..len].copy_from_slice(digits);
        Self::Inline { buf, len }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // A str prefix and ASCII digits: always UTF-8.
            Self::Inline { buf, len } => std::str::from_utf8(&buf[..*len]).unwrap_or_default(),
            Self::Heap(s) => s,
        }
    }
}

/// The request number in a correlation id that starts with `prefix`.
pub(crate) fn request_number(prefix: &str, correlation_id: &str) -> Option<u64> {
    let hex = correlation_id.strip_prefix(prefix)?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_round_trip() {
        assert_eq!(CorrelationId::new("kpc-1-", 0).as_str(), "kpc-1-0");
        assert_eq!(CorrelationId::new("kpc-1-", 0xabc).as_str(), "kpc-1-abc");
        assert_eq!(CorrelationId::new("r-", u64::MAX).as_str(), "r-ffffffffffffffff");
        let long = "x".repeat(200);
        assert_eq!(CorrelationId::new(&long, 0x1f).as_str(), format!("{long}1f"));
        assert_eq!(request_number("kpc-1-", "kpc-1-abc"), Some(0xabc));
        assert_eq!(request_number("kpc-1-", "kpc-2-abc"), None);
    }
}
