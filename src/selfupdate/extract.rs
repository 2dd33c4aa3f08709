//! **Where the agent's own binary is taken out of its image.** An agent release's image is
//! `FROM scratch` with one file, `/ferry-agent`: one layer, a tar archive, gzip-compressed or not.
//! The layer blob was checked against its digest (from the signed manifest) when the content
//! store fetched it; this reads that verified blob and writes the one regular file it holds.
//!
//! A minimal, strict tar reader (POSIX ustar headers, with pax and GNU long-name records
//! skipped): a header whose checksum is wrong, a second copy of the file, a link, a device, a
//! file larger than the cap, or an archive that ends early is an error, never a partial binary.

use std::io::{self, Read, Write};

/// The file an agent image holds.
pub const BINARY_NAME: &str = "ferry-agent";

const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("reading the agent image's layer: {0}")]
    Io(#[from] io::Error),
    #[error("the agent image's layer is not a tar archive: {0}")]
    NotTar(String),
    #[error("the agent image's layer has no regular file /{BINARY_NAME}")]
    Missing,
    #[error("the agent image's layer holds /{BINARY_NAME} more than once")]
    Duplicate,
    #[error("/{BINARY_NAME} in the agent image is {kind}, not a regular file")]
    NotRegular { kind: &'static str },
    #[error("/{BINARY_NAME} in the agent image is {size} bytes, over the {max}-byte cap")]
    TooLarge { size: u64, max: u64 },
    #[error("/{BINARY_NAME} in the agent image is not an executable for Linux (no ELF header)")]
    NotElf,
}

/// Stream the layer (`gzip` or plain tar, told apart by its magic bytes) and write
/// [`BINARY_NAME`] to `out`. Returns its size. At most `max` bytes are accepted for the file.
pub fn extract_binary(
    layer: impl Read,
    out: &mut impl Write,
    max: u64,
) -> Result<u64, ExtractError> {
    let mut layer = io::BufReader::new(layer);
    let magic = {
        use std::io::BufRead;
        let b = layer.fill_buf()?;
        b.len() >= 2 && b[0] == 0x1f && b[1] == 0x8b
    };
    if magic {
        extract_from_tar(flate2::read::GzDecoder::new(layer), out, max)
    } else {
        extract_from_tar(layer, out, max)
    }
}

fn extract_from_tar(
    mut tar: impl Read,
    out: &mut impl Write,
    max: u64,
) -> Result<u64, ExtractError> {
    let mut header = [0u8; BLOCK];
    let mut found: Option<u64> = None;
    // The name of the next entry, from a GNU `L` or pax `path=` record before it.
    let mut long_name: Option<String> = None;
    loop {
        if !read_block(&mut tar, &mut header)? {
            return Err(ExtractError::NotTar(
                "the archive ends without its end marker".into(),
            ));
        }
        if header.iter().all(|b| *b == 0) {
            break;
        }
        check_sum(&header)?;
        let size = octal(&header[124..136])
            .ok_or_else(|| ExtractError::NotTar("bad size field".into()))?;
        let kind = header[156];
        let name = match long_name.take() {
            Some(n) => n,
            None => entry_name(&header),
        };
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        match kind {
            // GNU long name, pax extended header: read, keep the path if it names one.
            b'L' | b'x' => {
                if size > 64 * 1024 {
                    return Err(ExtractError::NotTar("oversized extended header".into()));
                }
                let mut buf = vec![0u8; padded as usize];
                tar.read_exact(&mut buf)?;
                buf.truncate(size as usize);
                long_name = if kind == b'L' {
                    Some(
                        String::from_utf8_lossy(&buf)
                            .trim_end_matches('\0')
                            .to_string(),
                    )
                } else {
                    pax_path(&buf)
                };
                continue;
            }
            // pax global header: nothing we need.
            b'g' => {
                io::copy(&mut (&mut tar).take(padded), &mut io::sink())?;
                continue;
            }
            _ => {}
        }
        let is_ours = normalize(&name) == BINARY_NAME;
        if is_ours {
            if found.is_some() {
                return Err(ExtractError::Duplicate);
            }
            match kind {
                b'0' | 0 | b'7' => {}
                b'1' | b'2' => return Err(ExtractError::NotRegular { kind: "a link" }),
                b'5' => {
                    return Err(ExtractError::NotRegular {
                        kind: "a directory",
                    })
                }
                _ => {
                    return Err(ExtractError::NotRegular {
                        kind: "a special file",
                    })
                }
            }
            if size > max {
                return Err(ExtractError::TooLarge { size, max });
            }
            let mut body = (&mut tar).take(size);
            let mut first = [0u8; 4];
            body.read_exact(&mut first)
                .map_err(|_| ExtractError::NotElf)?;
            if first != *b"\x7fELF" {
                return Err(ExtractError::NotElf);
            }
            out.write_all(&first)?;
            let copied = io::copy(&mut body, out)? + 4;
            if copied != size {
                return Err(ExtractError::NotTar(
                    "the archive ends inside the file".into(),
                ));
            }
            io::copy(&mut (&mut tar).take(padded - size), &mut io::sink())?;
            found = Some(size);
        } else {
            let skipped = io::copy(&mut (&mut tar).take(padded), &mut io::sink())?;
            if skipped != padded {
                return Err(ExtractError::NotTar(
                    "the archive ends inside an entry".into(),
                ));
            }
        }
    }
    found.ok_or(ExtractError::Missing)
}

/// Fill `buf` with one block; false at a clean end of input (no byte of the block).
fn read_block(r: &mut impl Read, buf: &mut [u8; BLOCK]) -> Result<bool, ExtractError> {
    let mut got = 0;
    while got < BLOCK {
        let n = r.read(&mut buf[got..])?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(ExtractError::NotTar("a truncated header".into()));
        }
        got += n;
    }
    Ok(true)
}

fn check_sum(h: &[u8; BLOCK]) -> Result<(), ExtractError> {
    let want = octal(&h[148..156]).ok_or_else(|| ExtractError::NotTar("bad checksum".into()))?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(*b)
            }
        })
        .sum();
    if sum != want {
        return Err(ExtractError::NotTar("header checksum mismatch".into()));
    }
    Ok(())
}

/// An octal field: digits, ended by NUL or space (leading spaces allowed).
fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn entry_name(h: &[u8; BLOCK]) -> String {
    let name = cstr(&h[0..100]);
    // ustar: a prefix field for long paths.
    if &h[257..262] == b"ustar" {
        let prefix = cstr(&h[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// `path=` from pax records (`"<len> path=<value>\n"`).
fn pax_path(buf: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(buf);
    text.lines().find_map(|l| {
        let (_, kv) = l.split_once(' ')?;
        kv.strip_prefix("path=").map(str::to_string)
    })
}

/// `./ferry-agent`, `/ferry-agent` and `ferry-agent` are the same entry.
fn normalize(name: &str) -> &str {
    name.trim_start_matches("./").trim_start_matches('/')
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A ustar header for `name` of `size` bytes and type `kind`.
    pub(crate) fn header(name: &str, size: u64, kind: u8) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000755");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    /// A tar archive of `(name, kind, body)` entries.
    pub(crate) fn tar(entries: &[(&str, u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, body) in entries {
            out.extend_from_slice(&header(name, body.len() as u64, *kind));
            out.extend_from_slice(body);
            let pad = (BLOCK - body.len() % BLOCK) % BLOCK;
            out.extend(std::iter::repeat_n(0u8, pad));
        }
        out.extend(std::iter::repeat_n(0u8, 2 * BLOCK));
        out
    }

    pub(crate) fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn elf(n: usize) -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..n).map(|i| (i * 7 % 251) as u8));
        v
    }

    fn run(layer: &[u8]) -> Result<Vec<u8>, ExtractError> {
        let mut out = Vec::new();
        extract_binary(Cursor::new(layer), &mut out, 1 << 20).map(|n| {
            assert_eq!(n as usize, out.len());
            out
        })
    }

    #[test]
    fn the_binary_comes_out_of_plain_and_gzip_layers() {
        let bin = elf(3000);
        let t = tar(&[
            ("etc/", b'5', b""),
            ("./ferry-agent", b'0', &bin),
            ("README", b'0', b"hello"),
        ]);
        assert_eq!(run(&t).unwrap(), bin);
        assert_eq!(run(&gzip(&t)).unwrap(), bin);
    }

    #[test]
    fn a_long_name_record_names_the_next_entry() {
        let bin = elf(10);
        let t = tar(&[
            ("././@LongLink", b'L', b"ferry-agent\0"),
            ("ferry-ag", b'0', &bin),
        ]);
        assert_eq!(run(&t).unwrap(), bin);
        let t = tar(&[
            ("PaxHeaders/x", b'x', b"20 path=ferry-agent\n"),
            ("x", b'0', &bin),
        ]);
        assert_eq!(run(&t).unwrap(), bin);
    }

    #[test]
    fn anything_but_one_regular_elf_file_is_refused() {
        let bin = elf(10);
        assert!(matches!(
            run(&tar(&[("other", b'0', &bin)])),
            Err(ExtractError::Missing)
        ));
        assert!(matches!(
            run(&tar(&[
                ("ferry-agent", b'0', &bin),
                ("ferry-agent", b'0', &bin)
            ])),
            Err(ExtractError::Duplicate)
        ));
        assert!(matches!(
            run(&tar(&[("ferry-agent", b'2', b"")])),
            Err(ExtractError::NotRegular { .. })
        ));
        assert!(matches!(
            run(&tar(&[("ferry-agent", b'0', b"#!/bin/sh\nrm -rf /\n")])),
            Err(ExtractError::NotElf)
        ));
        let mut out = Vec::new();
        assert!(matches!(
            extract_binary(
                Cursor::new(tar(&[("ferry-agent", b'0', &bin)])),
                &mut out,
                5
            ),
            Err(ExtractError::TooLarge { .. })
        ));
        // Cut inside the file, a corrupted header, random bytes.
        let t = tar(&[("ferry-agent", b'0', &elf(5000))]);
        assert!(run(&t[..2000]).is_err());
        let mut bad = t.clone();
        bad[10] ^= 1;
        assert!(matches!(run(&bad), Err(ExtractError::NotTar(_))));
        assert!(run(&[7u8; 1500]).is_err());
        assert!(run(b"").is_err());
    }

    proptest::proptest! {
        /// Whatever the bytes, the reader ends with a value or an error, never a panic.
        #[test]
        fn arbitrary_layers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let _ = run(&bytes);
            let _ = run(&gzip(&bytes));
        }
    }
}
