//! Fuzzes the MQTT codec: the input is decoded as a stream, first by a fresh server codec (no
//! version until CONNECT), then by one set to MQTT 5, each until an error or need-more.
#![no_main]

use bytes::BytesMut;
use fleetgate_transport_mqtt::codec::{Codec, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for version in [None, Some(ProtocolVersion::V5)] {
        let mut codec = Codec::new(1 << 20);
        if let Some(v) = version {
            codec.set_version(v);
        }
        let mut buf = BytesMut::from(data);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
    }
});
