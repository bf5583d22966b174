//! Feeds arbitrary bytes to what the load generator parses of delivered messages and device
//! answers: the payload stamp (send time, step, run id) the delivery counter reads, and an
//! `/error` response body. None may panic; only a payload of this run counts as delivered.

#![no_main]

use std::cell::RefCell;

use fleetgate_benches::stats::DeliveryRecorder;

thread_local! {
    // One recorder for every input: making one allocates its histograms.
    static RECORDER: RefCell<DeliveryRecorder> = RefCell::new(DeliveryRecorder::new(3, "fuzzrun"));
}

fn delivered(r: &DeliveryRecorder) -> u64 {
    r.steps().iter().map(|s| s.delivered).sum()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fleetgate_benches::device::parse_error_body(data);
    RECORDER.with_borrow_mut(|recorder| {
        let before = delivered(recorder);
        recorder.record(data, u64::MAX / 2);
        let counted = delivered(recorder) - before;
        let ours = fleetgate_benches::payload::parse(data)
            .is_some_and(|stamp| stamp.run_id == b"fuzzrun" && stamp.step < 3);
        assert_eq!(counted, u64::from(ours));
    });
});
