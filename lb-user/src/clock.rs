//! The datapath's clock, seen from user space: conntrack and affinity timestamps are jiffies
//! (`bpf_jiffies64()`), so the daemon needs the current jiffies (to age entries) and the tick
//! rate (to turn timeouts in seconds into jiffies). The kernel publishes both only indirectly:
//! `/proc/timer_list` prints `jiffies` next to the monotonic clock (`now at N nsecs`), and two
//! readings a moment apart give the rate.

use std::{sync::OnceLock, time::Duration};

use tracing::warn;

const TIMER_LIST: &str = "/proc/timer_list";
/// The values `CONFIG_HZ` can take; a measured rate snaps to the nearest.
const TICK_RATES: [u32; 4] = [100, 250, 300, 1000];
/// Long enough that one tick of jitter cannot confuse 250 with 300 (25 vs 30 ticks).
const RATE_SAMPLE: Duration = Duration::from_millis(100);
/// Used when `/proc/timer_list` cannot be read (not root): Debian's `CONFIG_HZ`.
const FALLBACK_RATE: u32 = 250;

/// One reading of the kernel's clocks.
#[derive(Clone, Copy, Debug)]
struct Reading {
    jiffies: u64,
    monotonic_ns: u64,
}

/// The current jiffies, as `bpf_jiffies64()` would return them now.
pub fn jiffies_now() -> std::io::Result<u64> {
    read().map(|reading| reading.jiffies)
}

/// The kernel's tick rate, measured once per process.
pub fn jiffies_per_second() -> u32 {
    static RATE: OnceLock<u32> = OnceLock::new();
    *RATE.get_or_init(|| {
        measure_rate().unwrap_or_else(|error| {
            warn!(%error, fallback = FALLBACK_RATE, "cannot measure the kernel's tick rate from {TIMER_LIST}");
            FALLBACK_RATE
        })
    })
}

/// Seconds to jiffies at the kernel's rate.
pub fn seconds_to_jiffies(seconds: u64) -> u64 {
    seconds * u64::from(jiffies_per_second())
}

fn measure_rate() -> std::io::Result<u32> {
    let first = read()?;
    std::thread::sleep(RATE_SAMPLE);
    let second = read()?;
    let ticks = second.jiffies.saturating_sub(first.jiffies);
    let elapsed_ns = second.monotonic_ns.saturating_sub(first.monotonic_ns).max(1);
    #[expect(clippy::cast_precision_loss, reason = "tick and nanosecond counts far below 2^52")]
    let rate = ticks as f64 * 1e9 / elapsed_ns as f64;
    Ok(nearest_tick_rate(rate))
}

fn nearest_tick_rate(measured: f64) -> u32 {
    TICK_RATES
        .into_iter()
        .min_by(|a, b| {
            (f64::from(*a) - measured).abs().total_cmp(&(f64::from(*b) - measured).abs())
        })
        .expect("a non-empty list")
}

fn read() -> std::io::Result<Reading> {
    let text = std::fs::read_to_string(TIMER_LIST)?;
    parse(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{TIMER_LIST}: no `now at` or `jiffies:` line"),
        )
    })
}

/// The first `now at N nsecs` and `jiffies: N` lines of `/proc/timer_list`.
fn parse(text: &str) -> Option<Reading> {
    let monotonic_ns = text.lines().find_map(|line| {
        line.strip_prefix("now at ")?.strip_suffix(" nsecs")?.trim().parse().ok()
    })?;
    let jiffies =
        text.lines().find_map(|line| line.trim().strip_prefix("jiffies:")?.trim().parse().ok())?;
    Some(Reading { jiffies, monotonic_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_timer_list_header() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 7667381166782 nsecs\n\ncpu: 0\n jiffies: 4296809078\n";
        let reading = parse(text).expect("a reading");
        assert_eq!((reading.jiffies, reading.monotonic_ns), (4_296_809_078, 7_667_381_166_782));
        assert!(parse("cpu: 0\n").is_none());
    }

    /// The measured rate against the kernel's own configuration: `/proc/config.gz`
    /// (`CONFIG_IKCONFIG_PROC`, as on this project's CI kernels) or Debian's
    /// `/boot/config-<release>`.
    #[test]
    fn the_measured_rate_is_the_kernels_config_hz() {
        let from_proc = std::process::Command::new("zcat").arg("/proc/config.gz").output();
        let text = match from_proc {
            Ok(output) if output.status.success() => {
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
            _ => {
                let release =
                    std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
                let path = format!("/boot/config-{}", release.trim());
                std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("neither /proc/config.gz nor {path}: {e}"))
            }
        };
        let configured: u32 = text
            .lines()
            .find_map(|line| line.strip_prefix("CONFIG_HZ=")?.parse().ok())
            .expect("CONFIG_HZ in the kernel's configuration");
        assert_eq!(measure_rate().expect("reading /proc/timer_list (root)"), configured);
    }

    #[test]
    fn snaps_a_measured_rate_to_a_kernel_setting() {
        assert_eq!(nearest_tick_rate(96.0), 100);
        assert_eq!(nearest_tick_rate(262.0), 250);
        assert_eq!(nearest_tick_rate(291.0), 300);
        assert_eq!(nearest_tick_rate(990.0), 1000);
    }
}
