//! Feeds arbitrary datagrams to the CoAP decoder: it may refuse them, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) =
        fleetgate_transport_coap::codec::Message::decode(bytes::Bytes::copy_from_slice(data))
    {
        for _ in m.options() {}
    }
});
