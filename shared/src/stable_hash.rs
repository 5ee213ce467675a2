//! A hash whose value never changes between builds, Rust versions or machines (std's
//! hashers promise none of that): it assigns users to model variants and names embedding
//! sets, both of which must agree across processes and restarts.

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv64 {
    pub fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Where `key` falls in [0, 1): uniform over keys, fixed for a key. The FNV output is
/// finalised with splitmix64 so that keys differing in the last character spread well.
pub fn unit_interval(salt: &str, key: &str) -> f64 {
    let mut h = Fnv64::new();
    h.write(salt.as_bytes());
    h.write(&[0xff]);
    h.write(key.as_bytes());
    let mut z = h.finish().wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_never_change() {
        // The FNV-1a test vectors; if these move, every user changes variant.
        let mut h = Fnv64::new();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv64::new();
        h.write(b"foobar");
        assert_eq!(h.finish(), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn unit_interval_is_uniform_enough() {
        let n = 20_000;
        let below_quarter = (0..n)
            .filter(|i| unit_interval("ab", &format!("user-{i}")) < 0.25)
            .count();
        let share = below_quarter as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.015, "share {share}");
        assert_eq!(unit_interval("ab", "u1"), unit_interval("ab", "u1"));
        assert_ne!(unit_interval("ab", "u1"), unit_interval("cd", "u1"));
    }
}
