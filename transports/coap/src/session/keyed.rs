//! The session's cheap randomness: a xorshift generator seeded by the caller, and a keyed hash
//! for its integer-keyed tables.

/// A cheap keyed hash for the integer keys of a peer's tables (message ids the peer chooses,
/// tags and message ids we choose), instead of SipHash: a multiply-xorshift of the key mixed
/// with a per-peer random secret, so a peer cannot aim its message ids at collisions (and the
/// tables are bounded by `max_exchanges` anyway).
#[derive(Clone, Copy)]
pub(super) struct KeyedState(pub(super) u64);

impl std::hash::BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher(self.0)
    }
}

pub(super) struct KeyedHasher(u64);

impl std::hash::Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0xD6E8_FEB8_6659_FD93).rotate_left(29);
    }
}

/// The next number of a xorshift64 generator (its state must not be zero).
pub(super) fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// SplitMix64's output function: spreads a seed (0, 1, 2, ... in tests) over all 64 bits.
pub(super) fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
