//! 1/KP resource paths: `kp1/<appversion>/<extension>[/<token>]/<path...>[/<request id>]`.
//!
//! The same grammar serves MQTT topics and the URI paths of CoAP and HTTP. A parsed [`KpTopic`]
//! keeps the original bytes and only offsets into them, so its parts are zero-copy slices.

use std::ops::Range;

use bytes::Bytes;

/// Why a path is not a 1/KP request path. Always the device's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KpTopicError {
    /// The path is not valid UTF-8.
    #[error("resource path is not valid UTF-8")]
    InvalidUtf8,
    /// The path does not start with `kp1/`.
    #[error("resource path does not start with `kp1/`")]
    NotKp1,
    /// A level that must be present is missing or empty.
    #[error("resource path has no {0}")]
    Missing(&'static str),
    /// The path is longer than the 65535 bytes an MQTT topic can hold.
    #[error("resource path is longer than 65535 bytes")]
    TooLong,
}

/// Parses a final path level as a 1/KP request id (DESIGN decision 1): a decimal integer from 1
/// to 2147483647 without leading zeros.
pub fn parse_request_id(level: &str) -> Option<u32> {
    let bytes = level.as_bytes();
    if bytes.is_empty() || bytes.len() > 10 || bytes[0] == b'0' {
        return None;
    }
    let mut value: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u64::from(b - b'0');
    }
    if value <= i32::MAX as u64 { u32::try_from(value).ok() } else { None }
}

/// MQTT topic filter matching, used for subscriptions on every transport: `+` matches one
/// level, a final `#` the rest (including none).
pub fn topic_filter_matches(filter: &str, topic: &str) -> bool {
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A parsed 1/KP request path.
///
/// `kp1/demo-v1/dcx/tok1/json/42` has app version `demo-v1`, extension `dcx`, extension path
/// `/tok1/json`, request id 42; for an endpoint-aware extension, token `tok1` and resource path
/// `/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpTopic {
    raw: Bytes,
    app_version: Range<u16>,
    extension: Range<u16>,
    /// From the `/` after the extension up to (not including) the `/` before the request id.
    extension_path: Range<u16>,
    request_id: Option<u32>,
}

impl KpTopic {
    /// Parses `raw` (an MQTT topic, or a URI path without its leading slash).
    pub fn parse(raw: Bytes) -> Result<Self, KpTopicError> {
        let len = u16::try_from(raw.len()).map_err(|_| KpTopicError::TooLong)?;
        let text = std::str::from_utf8(&raw).map_err(|_| KpTopicError::InvalidUtf8)?;
        let rest = text.strip_prefix("kp1/").ok_or(KpTopicError::NotKp1)?;
        let app_end = rest.find('/').ok_or(KpTopicError::Missing("extension instance"))?;
        if app_end == 0 {
            return Err(KpTopicError::Missing("app version"));
        }
        let app_version = 4..4 + app_end;
        let after_app = app_version.end + 1;
        let ext_len = text[after_app..].find('/').unwrap_or(text.len() - after_app);
        if ext_len == 0 {
            return Err(KpTopicError::Missing("extension instance"));
        }
        let extension = after_app..after_app + ext_len;
        let mut path_end = text.len();
        let mut request_id = None;
        if let Some(last_slash) = text.rfind('/')
            && last_slash >= extension.end
            && let Some(id) = parse_request_id(&text[last_slash + 1..])
        {
            request_id = Some(id);
            path_end = last_slash;
        }
        if path_end <= extension.end + 1 {
            return Err(KpTopicError::Missing("resource path"));
        }
        let narrow = |r: Range<usize>| -> Range<u16> {
            // Every offset is at most `len`, which fits in u16.
            (r.start as u16)..(r.end as u16)
        };
        debug_assert!(path_end <= usize::from(len));
        Ok(Self {
            app_version: narrow(app_version),
            extension: narrow(extension.clone()),
            extension_path: narrow(extension.end..path_end),
            request_id,
            raw,
        })
    }

    fn slice(&self, r: &Range<u16>) -> &str {
        // The whole of `raw` was checked to be UTF-8 and every range ends at a '/' boundary.
        std::str::from_utf8(&self.raw[usize::from(r.start)..usize::from(r.end)]).unwrap_or("")
    }

    /// The whole path as received.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.raw).unwrap_or("")
    }

    /// The raw bytes as received.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The app version name (second level).
    pub fn app_version(&self) -> &str {
        self.slice(&self.app_version)
    }

    /// The extension instance name (third level).
    pub fn extension(&self) -> &str {
        self.slice(&self.extension)
    }

    /// Everything after the extension, with its leading slash and without the request id:
    /// `/tok1/json`. For an endpoint-unaware extension this is the resource path.
    pub fn extension_path(&self) -> &str {
        self.slice(&self.extension_path)
    }

    /// For an endpoint-aware extension: the endpoint token (first level after the extension).
    pub fn token(&self) -> Option<&str> {
        let path = self.extension_path().strip_prefix('/')?;
        let token = path.split('/').next()?;
        (!token.is_empty()).then_some(token)
    }

    /// For an endpoint-aware extension: the resource path after the token, with a leading
    /// slash (DESIGN decision 6), e.g. `/json`. `None` when nothing follows the token.
    pub fn resource_path(&self) -> Option<&str> {
        let path = self.extension_path().strip_prefix('/')?;
        let slash = path.find('/')?;
        let resource = &path[slash..];
        (resource.len() > 1).then_some(resource)
    }

    /// The request id, when the last level is one.
    pub fn request_id(&self) -> Option<u32> {
        self.request_id
    }

    /// The path without the request id (`kp1/demo-v1/dcx/tok1/json`), a zero-copy slice: the base
    /// to which responses append `[/<request id>]/status|error`.
    pub fn base(&self) -> Bytes {
        self.raw.slice(..usize::from(self.extension_path.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<KpTopic, KpTopicError> {
        KpTopic::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn topic_filters() {
        let t = "kp1/demo-v1/dcx/tok/json/42/status";
        assert!(topic_filter_matches("kp1/demo-v1/dcx/tok/json/#", t));
        assert!(topic_filter_matches("kp1/demo-v1/dcx/tok/#", t));
        assert!(topic_filter_matches("kp1/demo-v1/dcx/tok/json/+/status", t));
        assert!(topic_filter_matches(t, t));
        assert!(!topic_filter_matches("kp1/demo-v1/dcx/tok/json/+/error", t));
        assert!(!topic_filter_matches("kp1/demo-v1/dcx/tok/json", t));
        assert!(topic_filter_matches("kp1/demo-v1/dcx/tok/json/#", "kp1/demo-v1/dcx/tok/json"));
    }

    #[test]
    fn request_id_rule() {
        assert_eq!(parse_request_id("42"), Some(42));
        assert_eq!(parse_request_id("1"), Some(1));
        assert_eq!(parse_request_id("2147483647"), Some(2_147_483_647));
        assert_eq!(parse_request_id("2147483648"), None);
        assert_eq!(parse_request_id("99999999999"), None);
        assert_eq!(parse_request_id("0"), None);
        assert_eq!(parse_request_id("042"), None);
        assert_eq!(parse_request_id(""), None);
        assert_eq!(parse_request_id("+1"), None);
        assert_eq!(parse_request_id("4a"), None);
        assert_eq!(parse_request_id("٣"), None);
    }

    #[test]
    fn parses_data_collection_topic() {
        let t = parse("kp1/demo-v1/dcx/tok1/json/42").expect("valid");
        assert_eq!(t.app_version(), "demo-v1");
        assert_eq!(t.extension(), "dcx");
        assert_eq!(t.extension_path(), "/tok1/json");
        assert_eq!(t.token(), Some("tok1"));
        assert_eq!(t.resource_path(), Some("/json"));
        assert_eq!(t.request_id(), Some(42));
        assert_eq!(&t.base()[..], b"kp1/demo-v1/dcx/tok1/json");
    }

    #[test]
    fn without_request_id() {
        let t = parse("kp1/demo-v1/cmx/tok1/config/json/network").expect("valid");
        assert_eq!(t.request_id(), None);
        assert_eq!(t.resource_path(), Some("/config/json/network"));
        assert_eq!(&t.base()[..], b"kp1/demo-v1/cmx/tok1/config/json/network");
    }

    #[test]
    fn numeric_last_level_is_always_a_request_id() {
        let t = parse("kp1/a/dcx/tok/plain/7").expect("valid");
        assert_eq!(t.request_id(), Some(7));
        assert_eq!(t.resource_path(), Some("/plain"));
    }

    #[test]
    fn leading_zero_is_part_of_the_path() {
        let t = parse("kp1/a/dcx/tok/json/007").expect("valid");
        assert_eq!(t.request_id(), None);
        assert_eq!(t.resource_path(), Some("/json/007"));
    }

    #[test]
    fn token_without_resource() {
        let t = parse("kp1/a/dcx/tok").expect("valid");
        assert_eq!(t.token(), Some("tok"));
        assert_eq!(t.resource_path(), None);
        let t = parse("kp1/a/dcx/tok/42").expect("valid");
        assert_eq!(t.token(), Some("tok"));
        assert_eq!(t.resource_path(), None);
        assert_eq!(t.request_id(), Some(42));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse("kp2/a/dcx/t/json"), Err(KpTopicError::NotKp1));
        assert_eq!(parse("/kp1/a/dcx/t/json"), Err(KpTopicError::NotKp1));
        assert_eq!(parse("kp1//dcx/t/json"), Err(KpTopicError::Missing("app version")));
        assert_eq!(parse("kp1/a"), Err(KpTopicError::Missing("extension instance")));
        assert_eq!(parse("kp1/a//t"), Err(KpTopicError::Missing("extension instance")));
        assert_eq!(parse("kp1/a/dcx"), Err(KpTopicError::Missing("resource path")));
        assert_eq!(parse("kp1/a/dcx/"), Err(KpTopicError::Missing("resource path")));
        assert_eq!(parse("kp1/a/dcx/42"), Err(KpTopicError::Missing("resource path")));
        assert_eq!(
            KpTopic::parse(Bytes::from_static(b"kp1/a/\xff/x")),
            Err(KpTopicError::InvalidUtf8)
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            if let Ok(t) = parse(&s) {
                let _ = (t.token(), t.resource_path(), t.base(), t.app_version(), t.extension());
            }
        }

        #[test]
        fn never_panics_with_kp_prefix(s in "kp1/[a-z/0-9]{0,40}") {
            if let Ok(t) = parse(&s) {
                let _ = (t.token(), t.resource_path(), t.base());
                proptest::prop_assert!(s.starts_with(std::str::from_utf8(&t.base()).unwrap_or("?")));
            }
        }
    }
}
