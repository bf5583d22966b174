//! NATS subject syntax: tokens separated by `.`, `*` matching one token, `>` matching the rest.

/// Whether `subject` is a valid subject to publish to (no wildcards) or, with `allow_wildcards`,
/// to subscribe to.
pub fn is_valid_subject(subject: &str, allow_wildcards: bool) -> bool {
    if subject.is_empty() {
        return false;
    }
    let mut tokens = subject.split('.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() || token.chars().any(|c| c.is_whitespace()) {
            return false;
        }
        if token.contains('*') || token.contains('>') {
            if !allow_wildcards {
                return false;
            }
            let whole = token == "*" || (token == ">" && tokens.peek().is_none());
            if !whole {
                return false;
            }
        }
    }
    true
}

/// Whether the literal `subject` matches the subscription `pattern`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(subject_matches("a.b.c", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(subject_matches("a.*.c", "a.x.c"));
        assert!(!subject_matches("a.*.c", "a.x.y.c"));
        assert!(subject_matches("a.>", "a.x.y.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches(
            "kaa.v1.events.*.endpoint.>",
            "kaa.v1.events.dcx.endpoint.data-collection.x"
        ));
    }

    #[test]
    fn validity() {
        assert!(is_valid_subject("kaa.v1.service.dcx.esp.ClientData", false));
        assert!(!is_valid_subject("a..b", false));
        assert!(!is_valid_subject("a.*", false));
        assert!(is_valid_subject("a.*", true));
        assert!(is_valid_subject("a.>", true));
        assert!(!is_valid_subject("a.>.b", true));
        assert!(!is_valid_subject("a.b*", true));
        assert!(!is_valid_subject("a b", true));
        assert!(!is_valid_subject("", true));
    }
}
