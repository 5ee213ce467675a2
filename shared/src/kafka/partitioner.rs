//! The partition of a key, as the Java client and librdkafka's `murmur2_random` choose
//! it. A producer that groups records of many users into one record (the API's
//! impressions) needs it to put that record on the partition its users' keyed records
//! go to.

/// Kafka's `Utils.murmur2`, bit for bit.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions` (> 0): `toPositive(murmur2(key)) % n`.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    partition_of_hash(murmur2(key), partitions)
}

/// [`partition_of`] for a key whose [`murmur2`] was taken earlier (the count of
/// partitions may be learnt later).
pub fn partition_of_hash(hash: i32, partitions: i32) -> i32 {
    (hash & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_gives_what_kafka_utils_test_pins() {
        // org.apache.kafka.common.utils.UtilsTest.testMurmur2
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partitions_are_in_range_for_any_key() {
        for i in 0..1000 {
            let key = format!("user-{i}");
            let p = partition_of(key.as_bytes(), 7);
            assert!((0..7).contains(&p));
        }
        assert_eq!(partition_of(b"21", 1), 0);
    }
}
