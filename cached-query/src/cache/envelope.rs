//! The bytes stored under an entry key: a small header (magic, format version, the tag
//! stamps seen before the query ran) followed by the serde_json payload.
//!
//! ```text
//! [0xC9][format=1][n][len0][stamp0]..[len(n-1)][stamp(n-1)][json payload…]
//! ```
//! Stamp 0 is the namespace generation, the others are the entry's tags in template order.
//! Anything that does not parse, or has another format version, is treated as a miss.

const MAGIC: u8 = 0xC9;
/// Bumped whenever the layout changes; older entries then read as misses and are overwritten.
pub(crate) const FORMAT_VERSION: u8 = 1;

/// Whether `stamp` can be a stamp: 1 to 255 bytes. Stamps are read from Redis, so anything
/// may come back: an empty value (a key evicted between its creation and its read) or
/// garbage someone wrote. Such a stamp is never stored nor matched: the read is a miss.
pub(crate) fn valid_stamp(stamp: &[u8]) -> bool {
    (1..=255).contains(&stamp.len())
}

/// Encodes `payload` with the stamps the value was computed under; `None` when a stamp is
/// not [valid](valid_stamp) or there are more than 255 (the value must not be stored).
pub(crate) fn encode<S: AsRef<[u8]>>(stamps: &[S], payload: &[u8]) -> Option<Vec<u8>> {
    let n = u8::try_from(stamps.len()).ok()?;
    if !stamps.iter().all(|s| valid_stamp(s.as_ref())) {
        return None;
    }
    let header: usize = 3 + stamps.iter().map(|s| 1 + s.as_ref().len()).sum::<usize>();
    let mut out = Vec::with_capacity(header + payload.len());
    out.push(MAGIC);
    out.push(FORMAT_VERSION);
    out.push(n);
    for s in stamps {
        let s = s.as_ref();
        out.push(s.len() as u8); // checked by valid_stamp
        out.extend_from_slice(s);
    }
    out.extend_from_slice(payload);
    Some(out)
}

/// Why stored bytes were not usable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// Well-formed and computed under exactly the current stamps.
    Fresh(&'a [u8]),
    /// Well-formed but computed under other stamps (an invalidation or `clear` happened since).
    Stale,
    /// Not an entry of this format: corrupt, truncated or written by another format version.
    Corrupt,
}

/// The payload of a well-formed entry without checking its stamps (for a near-cache entry
/// whose stamps were checked and have not changed since).
pub(crate) fn payload(bytes: &[u8]) -> Option<&[u8]> {
    let [magic, version, n, rest @ ..] = bytes else {
        return None;
    };
    if *magic != MAGIC || *version != FORMAT_VERSION {
        return None;
    }
    let mut rest = rest;
    for _ in 0..*n {
        let (&len, tail) = rest.split_first()?;
        rest = tail.get(usize::from(len)..)?;
    }
    Some(rest)
}

/// Checks `bytes` against the current stamps and returns the payload if it is still valid.
pub(crate) fn decode<'a, S: AsRef<[u8]>>(bytes: &'a [u8], current: &[S]) -> Decoded<'a> {
    let [magic, version, n, rest @ ..] = bytes else {
        return Decoded::Corrupt;
    };
    if *magic != MAGIC || *version != FORMAT_VERSION {
        return Decoded::Corrupt;
    }
    let mut rest = rest;
    // A current stamp that cannot be one matches nothing (an empty one must not equal an
    // entry stored under an empty stamp by an older version: "absent = version 0").
    let mut stale =
        usize::from(*n) != current.len() || !current.iter().all(|c| valid_stamp(c.as_ref()));
    for i in 0..usize::from(*n) {
        let Some((&len, tail)) = rest.split_first() else {
            return Decoded::Corrupt;
        };
        let len = usize::from(len);
        if tail.len() < len {
            return Decoded::Corrupt;
        }
        let (stamp, tail) = tail.split_at(len);
        if current.get(i).is_none_or(|c| c.as_ref() != stamp) {
            stale = true;
        }
        rest = tail;
    }
    if stale {
        Decoded::Stale
    } else {
        Decoded::Fresh(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamps() -> Vec<Vec<u8>> {
        vec![vec![1; 16], vec![2; 16]]
    }

    #[test]
    fn stamps_that_cannot_be_stamps_are_never_stored_nor_matched() {
        for bad in [vec![], vec![7u8; 256], vec![7u8; 1000]] {
            assert_eq!(encode(&[vec![1u8; 16], bad.clone()], b"1"), None);
            // An entry stored (by hand, or an older version) under that stamp is not fresh.
            let mut forged = vec![MAGIC, FORMAT_VERSION, 1, 0];
            forged.extend_from_slice(b"1");
            assert_ne!(
                decode(&forged, std::slice::from_ref(&bad)),
                Decoded::Fresh(b"1")
            );
        }
        let too_many: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 16]).collect();
        assert_eq!(encode(&too_many, b"1"), None);
        assert!(encode(&[vec![1u8; 255]], b"1").is_some());
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&stamps(), b"{\"a\":1}").unwrap();
        assert_eq!(decode(&bytes, &stamps()), Decoded::Fresh(b"{\"a\":1}"));
        assert_eq!(payload(&bytes), Some(&b"{\"a\":1}"[..]));
        assert_eq!(payload(&bytes[..10]), None);
    }

    #[test]
    fn other_stamps_are_stale() {
        let bytes = encode(&stamps(), b"1").unwrap();
        let mut now = stamps();
        now[1][0] = 9;
        assert_eq!(decode(&bytes, &now), Decoded::Stale);
        assert_eq!(decode(&bytes, &now[..1]), Decoded::Stale);
    }

    #[test]
    fn garbage_and_truncation_are_corrupt_never_panics() {
        let bytes = encode(&stamps(), b"1").unwrap();
        for cut in 0..bytes.len() - 1 {
            let d = decode(&bytes[..cut], &stamps());
            assert!(matches!(d, Decoded::Corrupt | Decoded::Fresh(_)), "{cut}");
        }
        assert_eq!(decode(b"hello world", &stamps()), Decoded::Corrupt);
        let mut old = bytes.clone();
        old[1] = 0;
        assert_eq!(decode(&old, &stamps()), Decoded::Corrupt);
    }
}

/// Cached bytes are untrusted input (anyone with Redis access can write them): a bounded,
/// deterministic fuzz run over the decoder, in the regular test suite.
#[cfg(test)]
mod fuzz {
    use super::*;

    /// xorshift64*: reproducible without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Typed {
        id: i64,
        name: String,
        tags: Vec<Option<u8>>,
    }

    #[test]
    fn decoding_garbage_never_panics() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let stamps = vec![vec![7u8; 16], vec![9u8; 16], vec![1u8; 3]];
        let valid = encode(&stamps, br#"{"id":1,"name":"x","tags":[1,null]}"#).unwrap();
        let (mut fresh, mut stale, mut corrupt) = (0, 0, 0);
        for round in 0..200_000 {
            let mut bytes = if round % 2 == 0 {
                valid.clone()
            } else {
                Vec::new()
            };
            match round % 4 {
                // flip, insert and delete bytes of a valid envelope
                0 => {
                    for _ in 0..=rng.below(4) {
                        let i = rng.below(bytes.len());
                        bytes[i] = rng.next() as u8;
                    }
                }
                2 => {
                    let i = rng.below(bytes.len());
                    if rng.below(2) == 0 {
                        bytes.insert(i, rng.next() as u8);
                    } else {
                        bytes.truncate(i);
                    }
                }
                // pure noise, often starting like an envelope
                _ => {
                    let len = rng.below(64);
                    bytes.extend((0..len).map(|_| rng.next() as u8));
                    if rng.below(2) == 0 && bytes.len() >= 2 {
                        bytes[0] = 0xC9;
                        bytes[1] = FORMAT_VERSION;
                    }
                }
            }
            match decode(&bytes, &stamps) {
                Decoded::Fresh(payload) => {
                    fresh += 1;
                    let _ = serde_json::from_slice::<Typed>(payload);
                }
                Decoded::Stale => stale += 1,
                Decoded::Corrupt => corrupt += 1,
            }
        }
        // The run explored all three outcomes.
        assert!(
            fresh > 100 && stale > 100 && corrupt > 100,
            "{fresh} {stale} {corrupt}"
        );
    }
}
