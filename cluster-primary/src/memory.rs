//! How much memory a worker uses, from `/proc/PID/smaps_rollup`: proportional (PSS) and
//! unique (USS) set sizes, which unlike RSS do not count pages shared copy-on-write with
//! other processes in full.

use crate::event::Memory;

/// The memory of process `pid`, or `None` where the kernel does not tell (no `/proc`, no
/// `smaps_rollup` before Linux 4.14, a process gone meanwhile).
pub(crate) fn of_process(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_smaps_rollup(&text)
}

/// Reads PSS and USS (private clean + private dirty) out of `smaps_rollup`'s text.
fn parse_smaps_rollup(text: &str) -> Option<Memory> {
    let mut pss = None;
    let mut private = 0u64;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        let bytes = kib.saturating_mul(1024);
        match name {
            "Pss:" => pss = Some(bytes),
            "Private_Clean:" | "Private_Dirty:" => private = private.saturating_add(bytes),
            _ => {}
        }
    }
    Some(Memory::new(pss?, private))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_and_private_pages_are_read_in_bytes() {
        let text = "55a0e0a3c000-7ffd9f1fe000 ---p 00000000 00:00 0    [rollup]\n\
                    Rss:                3072 kB\n\
                    Pss:                1200 kB\n\
                    Pss_Anon:            800 kB\n\
                    Shared_Clean:       1800 kB\n\
                    Private_Clean:       100 kB\n\
                    Private_Dirty:       900 kB\n";
        assert_eq!(
            parse_smaps_rollup(text),
            Some(Memory::new(1200 * 1024, 1000 * 1024))
        );
        assert_eq!(parse_smaps_rollup("Rss: 10 kB\n"), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let memory = of_process(std::process::id()).expect("smaps_rollup");
        assert!(memory.pss > 0 && memory.uss > 0 && memory.uss <= memory.pss * 2);
    }
}
