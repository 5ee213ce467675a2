//! What the binary forms of the internal topics' records share
//! ([`crate::state_record`], [`crate::list_record`]): two bytes first, a zero byte, which
//! no JSON text starts with (so a reader tells the form from JSON by the first byte), and
//! the form's version.

/// The first two bytes of a record in a binary form, version 1.
pub const MAGIC: [u8; 2] = [0x00, 0x01];

/// Why a record meant as a binary form has no body this build can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Its version is another than 1.
    UnknownVersion(u8),
    /// It ends before its version.
    Cut,
}

/// Whether `bytes` are in a binary form (else they are meant as JSON).
pub fn is_binary(bytes: &[u8]) -> bool {
    bytes.first() == Some(&MAGIC[0])
}

/// The bytes after a binary record's magic, once its version is known to be 1.
pub fn body(bytes: &[u8]) -> Result<&[u8], Framing> {
    match bytes.get(1) {
        Some(&version) if version == MAGIC[1] => Ok(&bytes[2..]),
        Some(&version) => Err(Framing::UnknownVersion(version)),
        None => Err(Framing::Cut),
    }
}

/// Calls `f` on every cut of `good` (each prefix) and on five flips of each of its bytes,
/// with what was done: how the tests make sure that a record's check refuses exactly what
/// its decoder refuses. Returns how many of the flipped records `refused` refuses.
#[cfg(test)]
pub(crate) fn each_cut_and_flip(
    good: &[u8],
    mut f: impl FnMut(&[u8], &str),
    refused: impl Fn(&[u8]) -> bool,
) -> usize {
    for end in 0..good.len() {
        f(&good[..end], &format!("cut at {end}"));
    }
    let mut refusals = 0;
    for at in 0..good.len() {
        for flip in [0x01, 0x02, 0x10, 0x80, 0xff] {
            let mut bytes = good.to_vec();
            bytes[at] ^= flip;
            f(&bytes, &format!("byte {at} ^ {flip:#x}"));
            refusals += refused(&bytes) as usize;
        }
    }
    refusals
}

/// Asserts that a record's decoder refuses `good` cut short or followed by a byte (its
/// message naming the binary form), and `good` marked as version 2 (its message naming
/// the version and saying to upgrade). `refused` gives the decoder's error message.
#[cfg(test)]
pub(crate) fn assert_framing_refused(good: &[u8], refused: impl Fn(&[u8]) -> String) {
    for end in [1, 2, 3, good.len() / 2, good.len() - 1] {
        let message = refused(&good[..end]);
        assert!(message.contains("binary form"), "{end}: {message}");
    }
    let longer = [good, &[0]].concat();
    assert!(refused(&longer).contains("binary form"));
    let mut newer = good.to_vec();
    newer[1] = 2;
    let message = refused(&newer);
    assert!(
        message.contains("version 2") && message.contains("upgrade"),
        "{message}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_record_is_told_from_json_and_its_version_read() {
        assert!(is_binary(&[0, 1, 7]) && !is_binary(b"{}") && !is_binary(b""));
        assert_eq!(body(&[0, 1, 7]), Ok(&[7u8][..]));
        assert_eq!(body(&[0, 1]), Ok(&[][..]));
        assert_eq!(body(&[0, 2, 7]), Err(Framing::UnknownVersion(2)));
        assert_eq!(body(&[0]), Err(Framing::Cut));
    }
}
