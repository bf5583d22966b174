//! The sliding replay window (SPEC §4.3): the highest packet number accepted and a bitmap of
//! the `BITS` numbers below and including it. A pure value, checked in two steps as WireGuard
//! does: [`ReplayWindow::may_accept`] before decryption (cheap, changes nothing, so a forged
//! packet number cannot move the window) and [`ReplayWindow::accept`] after the AEAD tag
//! verified.

/// A replay window over the last `WORDS * 64` packet numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow<const WORDS: usize = 1> {
    /// Highest number accepted plus one (0: none yet).
    top: u64,
    /// Bit `i` of the bitmap (word `i / 64`, bit `i % 64`) stands for number `top - 1 - i`.
    bits: [u64; WORDS],
}

impl<const WORDS: usize> Default for ReplayWindow<WORDS> {
    fn default() -> Self {
        Self { top: 0, bits: [0; WORDS] }
    }
}

impl<const WORDS: usize> ReplayWindow<WORDS> {
    /// Numbers the window remembers.
    pub const SIZE: u64 = WORDS as u64 * 64;

    /// Whether `n` may be new: above the window, or inside it and not seen. Changes nothing.
    pub fn may_accept(&self, n: u64) -> bool {
        if n >= self.top {
            return true;
        }
        let back = self.top - 1 - n;
        back < Self::SIZE && !self.bit(back)
    }

    /// Records `n` if it is new; false for a replay or a number too old to tell.
    pub fn accept(&mut self, n: u64) -> bool {
        if !self.may_accept(n) {
            return false;
        }
        if n >= self.top {
            self.shift(n + 1 - self.top);
            self.top = n + 1;
        }
        let back = self.top - 1 - n;
        self.set(back);
        true
    }

    fn bit(&self, back: u64) -> bool {
        let (w, b) = ((back / 64) as usize, back % 64);
        self.bits[w] >> b & 1 == 1
    }

    fn set(&mut self, back: u64) {
        let (w, b) = ((back / 64) as usize, back % 64);
        self.bits[w] |= 1 << b;
    }

    /// Moves every remembered number `by` places further back.
    fn shift(&mut self, by: u64) {
        if by >= Self::SIZE {
            self.bits = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let from = i.checked_sub(words);
            let hi = from.map_or(0, |f| self.bits[f] << bits);
            let lo = match (from.and_then(|f| f.checked_sub(1)), bits) {
                (Some(f), b) if b > 0 => self.bits[f] >> (64 - b),
                _ => 0,
            };
            self.bits[i] = hi | lo;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// The model: every number ever accepted, and the highest.
    #[derive(Default)]
    struct Model {
        seen: BTreeSet<u64>,
    }

    impl Model {
        fn accept(&mut self, n: u64, size: u64) -> bool {
            let top = self.seen.last().copied();
            let too_old = top.is_some_and(|t| n + size <= t);
            if too_old || self.seen.contains(&n) {
                return false;
            }
            self.seen.insert(n);
            true
        }
    }

    fn check<const W: usize>(ops: &[u64]) {
        let mut window = ReplayWindow::<W>::default();
        let mut model = Model::default();
        for &n in ops {
            let may = window.may_accept(n);
            let expected = model.accept(n, ReplayWindow::<W>::SIZE);
            assert_eq!(may, expected, "may_accept({n})");
            assert_eq!(window.accept(n), expected, "accept({n})");
        }
    }

    /// Packet numbers that mostly climb, with reordering and repeats: deltas from the last.
    fn ops() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec((-300i64..300, 0u8..4), 1..400).prop_map(|steps| {
            let mut n: i64 = 1000;
            steps
                .into_iter()
                .map(|(d, big)| {
                    n = (n + d * i64::from(big + 1)).max(0);
                    n as u64
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn agrees_with_the_model_64(ops in ops()) { check::<1>(&ops); }
        #[test]
        fn agrees_with_the_model_128(ops in ops()) { check::<2>(&ops); }
        #[test]
        fn agrees_with_the_model_256(ops in ops()) { check::<4>(&ops); }
    }

    #[test]
    fn edges() {
        let mut w = ReplayWindow::<1>::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(64));
        assert!(w.accept(1), "64 - 1 is the oldest number inside");
        assert!(!w.accept(0), "65 numbers back is outside");
        assert!(w.accept(1 << 62));
        assert!(!w.may_accept(64));
    }
}
