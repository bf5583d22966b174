use super::*;

fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    Message::decode(Bytes::copy_from_slice(bytes))
}

fn encode(
    mtype: MessageType,
    code: Code,
    id: u16,
    token: &[u8],
    options: &[(u16, &[u8])],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut w = MessageWriter::new(&mut out, mtype, code, id, token).expect("token");
    for (n, v) in options {
        w.option(*n, v).expect("option");
    }
    w.payload(payload);
    out.to_vec()
}

const GET_TEMPERATURE: &[u8] = b"\x40\x01\x7d\x34\xbbtemperature";

#[test]
fn rfc7252_figure_16_request() {
    // RFC 7252 Appendix A, Figure 16: CON [0x7d34] GET /temperature
    let m = decode(GET_TEMPERATURE).expect("valid");
    assert_eq!(m.mtype(), MessageType::Confirmable);
    assert_eq!(m.code(), Code::GET);
    assert_eq!(m.message_id(), 0x7d34);
    assert!(m.token().is_empty());
    assert_eq!(m.uri_path().collect::<Vec<_>>(), vec![&b"temperature"[..]]);
    assert!(m.payload().is_empty());
    assert_eq!(m.known().uri_path_segments, 1);
    let built = encode(
        MessageType::Confirmable,
        Code::GET,
        0x7d34,
        b"",
        &[(option::URI_PATH, b"temperature")],
        b"",
    );
    assert_eq!(built, GET_TEMPERATURE);
}

#[test]
fn rfc7252_figure_16_piggybacked_response() {
    // ACK [0x7d34] 2.05 Content "22.3 C"
    let wire = b"\x60\x45\x7d\x34\xff22.3 C";
    let m = decode(wire).expect("valid");
    assert_eq!(m.mtype(), MessageType::Acknowledgement);
    assert_eq!(m.code(), Code::CONTENT);
    assert_eq!(m.code().to_string(), "2.05");
    assert_eq!(&m.payload()[..], b"22.3 C");
    assert_eq!(
        encode(MessageType::Acknowledgement, Code::CONTENT, 0x7d34, b"", &[], b"22.3 C"),
        wire
    );
}

#[test]
fn rfc7252_figure_17_token() {
    // CON [0x7d35] GET /temperature, Token 0x20; ACK 2.05 with the same token.
    let req = b"\x41\x01\x7d\x35\x20\xbbtemperature";
    let m = decode(req).expect("valid");
    assert_eq!(m.token().as_slice(), &[0x20]);
    let ack = b"\x61\x45\x7d\x35\x20\xff22.3 C";
    let r = decode(ack).expect("valid");
    assert_eq!(r.token(), m.token());
    assert_eq!(
        encode(MessageType::Acknowledgement, Code::CONTENT, 0x7d35, &[0x20], &[], b"22.3 C"),
        ack
    );
}

#[test]
fn rfc7252_separate_response_and_empty_ack() {
    // Figure 18/19: empty ACK [0x7a10], then CON [0x23bb] 2.05 with token 0x73.
    let mut out = BytesMut::new();
    write_empty(&mut out, MessageType::Acknowledgement, 0x7a10);
    assert_eq!(&out[..], b"\x60\x00\x7a\x10");
    let m = decode(&out).expect("valid");
    assert!(m.code().is_empty());
    let sep = b"\x41\x45\x23\xbb\x73\xff22.3 C";
    let m = decode(sep).expect("valid");
    assert_eq!(
        (m.mtype(), m.code(), m.message_id()),
        (MessageType::Confirmable, Code::CONTENT, 0x23bb)
    );
    assert_eq!(m.token().as_slice(), &[0x73]);
}

#[test]
fn extended_delta_and_length() {
    // Uri-Path of 300 bytes: length 269 + 31; then Size1 (60) = 2048: delta 49 is 13 + 36.
    let long = vec![b'a'; 300];
    let wire = encode(
        MessageType::NonConfirmable,
        Code::POST,
        1,
        b"tk",
        &[(option::URI_PATH, &long), (option::SIZE1, &[0x08, 0x00])],
        b"x",
    );
    assert_eq!(&wire[6..9], &[0xbe, 0x00, 31]);
    assert_eq!(&wire[9 + 300..9 + 300 + 4], &[0xd2, 36, 0x08, 0x00]);
    let m = decode(&wire).expect("valid");
    assert_eq!(m.known().size1, Some(2048));
    // Uri-Path longer than 255 is outside its range: an unrecognised critical option.
    assert_eq!(m.known().unrecognized_critical, Some(option::URI_PATH));
}

#[test]
fn known_options_are_summarised() {
    let wire = encode(
        MessageType::Confirmable,
        Code::POST,
        7,
        b"\x01\x02\x03\x04",
        &[
            (option::OBSERVE, &[]),
            (option::URI_PATH, b"kp1"),
            (option::URI_PATH, b"a"),
            (option::CONTENT_FORMAT, &[50]),
            (option::MAX_AGE, &[0x01, 0x00]),
            (option::URI_QUERY, b"u=x"),
            (option::BLOCK1, &[0x1e]),
            (option::SIZE1, &[0x0c, 0x00]),
        ],
        b"payload",
    );
    let m = decode(&wire).expect("valid");
    let k = m.known();
    assert_eq!(k.observe, Some(0));
    assert_eq!(k.content_format, Some(50));
    assert_eq!(k.max_age, Some(256));
    assert_eq!(k.block1, Some(BlockOption { num: 1, more: true, szx: 6 }));
    assert_eq!(k.size1, Some(3072));
    assert_eq!(k.unrecognized_critical, None);
    assert_eq!(m.uri_query().collect::<Vec<_>>(), vec![&b"u=x"[..]]);
    let mut path = BytesMut::new();
    m.write_uri_path(&mut path);
    assert_eq!(&path[..], b"kp1/a");
}

#[test]
fn unknown_and_repeated_critical_options() {
    let m = decode(&encode(
        MessageType::Confirmable,
        Code::POST,
        1,
        b"",
        &[(option::OSCORE, b"")],
        b"",
    ))
    .expect("valid");
    assert_eq!(m.known().unrecognized_critical, Some(option::OSCORE));
    let m = decode(&encode(
        MessageType::Confirmable,
        Code::POST,
        1,
        b"",
        &[(option::BLOCK1, &[0x08]), (option::BLOCK1, &[0x18])],
        b"",
    ))
    .expect("valid");
    assert_eq!(m.known().block1, Some(BlockOption { num: 0, more: true, szx: 0 }));
    assert_eq!(m.known().unrecognized_critical, Some(option::BLOCK1));
    // An unknown elective option (2000) and a repeated elective one are ignored.
    let m = decode(&encode(
        MessageType::Confirmable,
        Code::POST,
        1,
        b"",
        &[(option::CONTENT_FORMAT, &[0]), (option::CONTENT_FORMAT, &[50]), (2000, b"zz")],
        b"",
    ))
    .expect("valid");
    assert_eq!(m.known().content_format, Some(0));
    assert_eq!(m.known().unrecognized_critical, None);
    let m = decode(&encode(
        MessageType::Confirmable,
        Code::POST,
        1,
        b"",
        &[(option::PROXY_URI, b"coap://x")],
        b"",
    ))
    .expect("valid");
    assert!(m.known().proxy);
}

#[test]
fn malformed_messages_are_rejected_precisely() {
    assert_eq!(decode(b"\x40\x01\x00"), Err(DecodeError::TooShort(3)));
    assert_eq!(decode(b"\x80\x01\x00\x01"), Err(DecodeError::UnknownVersion(2)));
    assert_eq!(decode(b"\x49\x01\x00\x01"), Err(DecodeError::InvalidTokenLength(9)));
    assert_eq!(decode(b"\x44\x01\x00\x01\xaa"), Err(DecodeError::Truncated("token")));
    assert_eq!(decode(b"\x40\x01\x00\x01\xd1"), Err(DecodeError::Truncated("option header")));
    assert_eq!(decode(b"\x40\x01\x00\x01\xe1\x00"), Err(DecodeError::Truncated("option header")));
    assert_eq!(decode(b"\x40\x01\x00\x01\xb5abc"), Err(DecodeError::Truncated("option value")));
    assert_eq!(decode(b"\x40\x01\x00\x01\xf1a"), Err(DecodeError::ReservedNibble("delta")));
    assert_eq!(decode(b"\x40\x01\x00\x01\x1fa"), Err(DecodeError::ReservedNibble("length")));
    assert_eq!(decode(b"\x40\x01\x00\x01\xff"), Err(DecodeError::EmptyPayload));
    assert_eq!(decode(b"\x40\x00\x00\x01\xff\x01"), Err(DecodeError::EmptyWithContent));
    assert_eq!(decode(b"\x41\x00\x00\x01\x01"), Err(DecodeError::EmptyWithContent));
    // A delta of 0xfeff + 269 = 65548 is past 65535; two deltas of 65293 add up past it.
    assert_eq!(
        decode(b"\x40\x01\x00\x01\xe0\xfe\xff"),
        Err(DecodeError::OptionNumberOverflow(65_548))
    );
    assert_eq!(
        decode(b"\x40\x01\x00\x01\xe0\xfe\x00\xe0\xfe\x00"),
        Err(DecodeError::OptionNumberOverflow(130_586))
    );
    // The largest number that still fits: 0xfef2 + 269 = 65535.
    let m = decode(b"\x40\x01\x00\x01\xe0\xfe\xf2").expect("65535 fits");
    assert_eq!(m.options().collect::<Vec<_>>(), vec![(65_535u16, &b""[..])]);
}

#[test]
fn header_peek() {
    assert_eq!(
        Header::peek(b"\x40\x01\x12\x34\xf1"),
        Some(Header { mtype: MessageType::Confirmable, code: Code::GET, message_id: 0x1234 })
    );
    assert_eq!(Header::peek(b"\x40\x01\x12"), None);
    assert_eq!(Header::peek(b"\xc0\x01\x12\x34"), None);
}

#[test]
fn writer_rejects_caller_bugs() {
    let mut out = BytesMut::new();
    assert_eq!(
        MessageWriter::new(&mut out, MessageType::Confirmable, Code::GET, 1, &[0; 9]).err(),
        Some(EncodeError::TokenTooLong(9))
    );
    let mut w =
        MessageWriter::new(&mut out, MessageType::Confirmable, Code::GET, 1, b"").expect("ok");
    w.option(11, b"a").expect("ok");
    assert_eq!(w.option(6, b"").err(), Some(EncodeError::OptionOutOfOrder { number: 6, last: 11 }));
    assert_eq!(w.option(12, &vec![0; 65_805]).err(), Some(EncodeError::OptionTooLong(65_805)));
}

#[test]
fn uint_options_use_the_shortest_form() {
    for (value, len) in [(0u32, 0usize), (1, 1), (255, 1), (256, 2), (65_536, 3), (u32::MAX, 4)] {
        let mut out = BytesMut::new();
        let mut w =
            MessageWriter::new(&mut out, MessageType::NonConfirmable, Code::CONTENT, 1, b"")
                .expect("ok");
        w.uint_option(option::MAX_AGE, value).expect("ok");
        w.finish();
        let m = Message::decode(out.freeze()).expect("valid");
        let (n, v) = m.options().next().expect("one option");
        assert_eq!((n, v.len()), (option::MAX_AGE, len));
        assert_eq!(m.known().max_age, Some(value));
    }
}

#[test]
fn block_option_values() {
    let b = BlockOption { num: 1, more: true, szx: 6 };
    assert_eq!(b.value(), 0x1e);
    assert_eq!(b.size(), 1024);
    assert_eq!(BlockOption::from_value(0x1e), b);
    assert_eq!(BlockOption::szx_for(1024), 6);
    assert_eq!(BlockOption::szx_for(4096), 6);
    assert_eq!(BlockOption::szx_for(512), 5);
    assert_eq!(BlockOption::szx_for(600), 5);
    assert_eq!(BlockOption::szx_for(1), 0);
}

#[test]
fn codes_display_as_c_dd() {
    assert_eq!(Code::REQUEST_ENTITY_TOO_LARGE.to_string(), "4.13");
    assert_eq!(Code::CONTINUE.to_string(), "2.31");
    assert_eq!(Code::new(5, 3), Code::SERVICE_UNAVAILABLE);
    assert!(Code::POST.is_request());
    assert!(!Code::EMPTY.is_request());
    assert!(Code::CHANGED.is_response());
}

fn message_type() -> impl proptest::strategy::Strategy<Value = MessageType> {
    proptest::sample::select(vec![
        MessageType::Confirmable,
        MessageType::NonConfirmable,
        MessageType::Acknowledgement,
        MessageType::Reset,
    ])
}

proptest::proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        if let Ok(m) = decode(&bytes) {
            let _ = (m.options().count(), m.uri_path().count(), m.payload().len(), format!("{m:?}"));
            let mut path = BytesMut::new();
            m.write_uri_path(&mut path);
        }
        let _ = Header::peek(&bytes);
    }

    #[test]
    fn never_panics_after_a_valid_header(
        token in proptest::collection::vec(proptest::num::u8::ANY, 0..=8),
        tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
    ) {
        let mut bytes = vec![0x40 | token.len() as u8, 0x02, 0, 1];
        bytes.extend_from_slice(&token);
        bytes.extend_from_slice(&tail);
        if let Ok(m) = decode(&bytes) {
            let total: usize = m.options().map(|(_, v)| v.len()).sum();
            proptest::prop_assert!(total <= bytes.len());
        }
    }

    #[test]
    fn round_trips(
        mtype in message_type(),
        class in proptest::sample::select(vec![0u8, 2, 4, 5]),
        detail in 1u8..32,
        id in proptest::num::u16::ANY,
        token in proptest::collection::vec(proptest::num::u8::ANY, 0..=8),
        deltas in proptest::collection::vec((0u16..700, proptest::collection::vec(proptest::num::u8::ANY, 0..300)), 0..8),
        payload in proptest::collection::vec(proptest::num::u8::ANY, 0..100),
    ) {
        let mut number = 0u16;
        let mut options = Vec::new();
        for (delta, value) in &deltas {
            number = number.saturating_add(*delta);
            options.push((number, value.as_slice()));
        }
        let code = Code::new(class, detail);
        let wire = encode(mtype, code, id, &token, &options, &payload);
        let m = decode(&wire).expect("what we write decodes");
        proptest::prop_assert_eq!(m.mtype(), mtype);
        proptest::prop_assert_eq!(m.code(), code);
        proptest::prop_assert_eq!(m.message_id(), id);
        let got = m.token();
        proptest::prop_assert_eq!(got.as_slice(), &token[..]);
        proptest::prop_assert_eq!(m.options().collect::<Vec<_>>(), options);
        proptest::prop_assert_eq!(&m.payload()[..], &payload[..]);
    }

    #[test]
    fn block_values_round_trip(num in 0u32..(1 << 20), more in proptest::bool::ANY, szx in 0u8..8) {
        let b = BlockOption { num, more, szx };
        proptest::prop_assert_eq!(BlockOption::from_value(b.value()), b);
    }
}
