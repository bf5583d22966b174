//! Arbitrary datagrams through the FGU/1 header parser, the frame parser (as if the datagram
//! were a plaintext) and the replay window: they may refuse, never panic; the window never
//! accepts a number twice.
#![no_main]

use fleetgate_transport_udp::replay::ReplayWindow;
use fleetgate_transport_udp::wire::{Frames, Packet};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Packet::parse(data);
    for frame in Frames::new(data) {
        if frame.is_err() {
            break;
        }
    }
    let mut window = ReplayWindow::<2>::default();
    for chunk in data.chunks_exact(2) {
        // Small steps around a climbing number, so that the window's edges are reached.
        let n = u64::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        if window.accept(n) {
            assert!(!window.may_accept(n) && !window.accept(n), "{n} accepted twice");
        }
    }
});
