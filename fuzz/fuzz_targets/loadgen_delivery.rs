//! Feeds arbitrary bytes to what the load generator parses of delivered messages and device
//! answers: the payload stamp (send time, step, run id) the delivery counter reads, and an
//! `/error` response body. None may panic; a payload of another run is never counted.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fleetgate_benches::device::parse_error_body(data);
    let mut recorder = fleetgate_benches::stats::DeliveryRecorder::new(3, "fuzzrun");
    recorder.record(data, u64::MAX / 2);
    let counted = recorder.steps().iter().map(|s| s.delivered).sum::<u64>();
    if let Some(stamp) = fleetgate_benches::payload::parse(data) {
        assert_eq!(counted, u64::from(stamp.run_id == b"fuzzrun" && stamp.step < 3));
    } else {
        assert_eq!(counted, 0);
    }
});
