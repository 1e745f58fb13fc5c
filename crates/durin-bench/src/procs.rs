//! The child processes under test (`durin`, `order`, and the SDK examples that `python3` and
//! `node` run), their scratch directory, and the figures read about them (and about this
//! process) from `/proc`.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

/// How long a child may take to print its "listening on" line. Durin applies its
/// migrations before it listens, which takes well under a second on a fresh file, but the
/// machine is shared, so the limit is generous.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// One started child process, killed and reaped when dropped.
pub struct Service {
    name: &'static str,
    child: Child,
    /// Where the child's stderr (its log) goes; quoted in errors so a failed start explains itself.
    log: PathBuf,
    /// The base URLs parsed from the child's ready lines, e.g. `http://127.0.0.1:41234`, in
    /// the order of the prefixes given to [`Service::start`].
    pub urls: Vec<String>,
}

impl Service {
    /// Starts `program` with `args`, sends its stderr to `log`, and waits until it has
    /// printed, for each of `ready_prefixes`, a stdout line starting with that prefix
    /// followed by a base URL. The lines may come in any order; Durin with an egress, for
    /// one, prints its egress line before its main one.
    pub fn start(
        name: &'static str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        ready_prefixes: &[&'static str],
    ) -> Result<Self> {
        if ready_prefixes.is_empty() {
            bail!("{name}: no ready line to wait for");
        }
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                // A bare name (`python3`, `node`) is looked up on the PATH; a path is one of
                // the binaries this workspace builds.
                let hint = if program.components().count() > 1 {
                    "build it with `cargo build --release -p durin -p order-example`, or pass --bin-dir"
                } else {
                    "is it installed and on the PATH?"
                };
                format!("cannot start {} ({hint})", program.display())
            })?;
        let stdout = child.stdout.take();
        // From here on the guard owns the child, so every early return below kills it.
        let mut service = Service {
            name,
            child,
            log,
            urls: Vec::new(),
        };
        let stdout = stdout.ok_or_else(|| anyhow!("{name}: stdout was not captured"))?;
        // A thread reads stdout because std's pipes have no timeout; it keeps draining after
        // the ready lines so that the child can never block on a full pipe.
        let (tx, rx) = mpsc::channel();
        let prefixes = ready_prefixes.to_vec();
        std::thread::spawn(move || {
            let mut seen = vec![false; prefixes.len()];
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                for (i, prefix) in prefixes.iter().enumerate() {
                    if seen[i] {
                        continue;
                    }
                    if let Some(rest) = line.strip_prefix(prefix) {
                        let url = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        // A closed channel means the parent gave up waiting; keep draining.
                        seen[i] = true;
                        let _ = tx.send((i, url));
                        break;
                    }
                }
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut urls: Vec<Option<String>> = vec![None; ready_prefixes.len()];
        while let Some(missing) = urls.iter().position(Option::is_none) {
            let prefix = ready_prefixes[missing];
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((i, url)) if url.starts_with("http://") => {
                    urls[i] = Some(url.trim_end_matches('/').to_owned());
                }
                Ok((_, url)) => bail!(
                    "{name} printed an unexpected address {url:?}{}",
                    service.log_tail()
                ),
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "{name} did not print {prefix:?} within {}s{}",
                    STARTUP_TIMEOUT.as_secs(),
                    service.log_tail()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = service
                        .child
                        .try_wait()
                        .ok()
                        .flatten()
                        .map_or_else(|| "still running".to_owned(), |s| s.to_string());
                    bail!(
                        "{name} closed its stdout before printing {prefix:?} ({status}){}",
                        service.log_tail()
                    )
                }
            }
        }
        service.urls = urls.into_iter().flatten().collect();
        Ok(service)
    }

    /// The base URL of the first ready line, the child's main listener.
    pub fn url(&self) -> &str {
        self.urls.first().map_or("", String::as_str)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the child's log, formatted for appending to an error message.
    fn log_tail(&self) -> String {
        match fs::read_to_string(&self.log) {
            Ok(text) if !text.trim().is_empty() => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n  ");
                format!("; last lines of {}:\n  {tail}", self.log.display())
            }
            _ => format!(" ({} is empty)", self.log.display()),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // SIGKILL is fine: the database is scratch, and nothing after the run reads it.
        if let Err(e) = self.child.kill() {
            // The child may have exited already; then there is nothing to kill.
            if e.kind() != std::io::ErrorKind::InvalidInput {
                eprintln!("durin-bench: cannot kill {}: {e}", self.name);
            }
        }
        // Reaping avoids leaving a zombie behind if the bench is embedded in a longer process.
        let _ = self.child.wait();
    }
}

/// A fresh scratch directory, removed when dropped unless it is to be kept.
pub struct ScratchDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl ScratchDir {
    /// Creates a new directory under the system temp dir. The name carries the pid and the
    /// time, and `create_dir` fails rather than reuse an existing directory, so a stale
    /// database can never leak into a run.
    pub fn create(keep: bool) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path =
            std::env::temp_dir().join(format!("durin-bench-{}-{nanos:x}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(ScratchDir { path, keep })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("durin-bench: kept {}", self.path.display());
        } else if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("durin-bench: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// User plus system CPU time of a process so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("unexpected format of {path}: {stat:?}"))
}

/// Extracts utime + stime (fields 14 and 15 of proc(5)) from a `/proc/PID/stat` line. The
/// command name (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`, after which the state is field 3.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let [utime, stime, _, _] = parse_times(stat)?;
    Some(utime + stime)
}

/// utime, stime, cutime and cstime (fields 14 to 17 of proc(5)) of a `/proc/PID/stat` line.
fn parse_times(stat: &str) -> Option<[u64; 4]> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let mut times = [0; 4];
    for time in &mut times {
        *time = fields.next()?.parse().ok()?;
    }
    Some(times)
}

/// The command name (field 2) of a `/proc/PID/stat` line, without its parentheses.
fn parse_comm(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// How many statements the database at `url` has run so far, by `pg_stat_statements`
/// (through `psql`); `None` when the extension or `psql` is not there.
pub fn postgres_statements(url: &str) -> Option<u64> {
    let output = std::process::Command::new("psql")
        .args([
            url,
            "-Atqc",
            "SELECT sum(calls) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname = current_database()",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())?;
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

/// The CPU time so far of the PostgreSQL servers on this machine, see [`postgres_cpu`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresCpu {
    pub ticks: u64,
    /// The pids of the postmasters (the `postgres` processes whose parent is not one), in
    /// ascending order: two readings compare only when these are the same, since a server
    /// restarted between them starts its counts again.
    pub postmasters: Vec<u32>,
}

impl PostgresCpu {
    /// The ticks from `self` to `later`; `None` when a server started or stopped between the
    /// two readings.
    pub fn ticks_until(&self, later: &PostgresCpu) -> Option<u64> {
        (self.postmasters == later.postmasters).then(|| later.ticks.saturating_sub(self.ticks))
    }
}

/// CPU ticks so far of every PostgreSQL server process on this machine (command name
/// `postgres`: the postmaster, its background processes and every backend, whatever its
/// database), or `None` when there is none. A process's own user + system time is counted
/// while it lives, and its reaped children's (cutime + cstime) with it, so a backend that
/// ends between two readings is still counted, in its postmaster's figure. Only a server
/// on this machine can be read: a remote one gives `None`.
pub fn postgres_cpu() -> Option<PostgresCpu> {
    // (pid, parent, ticks) of every `postgres` process.
    let mut processes = Vec::new();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read: it is then skipped.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if parse_comm(&stat) != Some("postgres") {
            continue;
        }
        if let (Some(parent), Some(times)) = (parse_parent(&stat), parse_times(&stat)) {
            processes.push((pid, parent, times.iter().sum::<u64>()));
        }
    }
    if processes.is_empty() {
        return None;
    }
    let pids: std::collections::HashSet<u32> = processes.iter().map(|p| p.0).collect();
    let mut postmasters: Vec<u32> = processes
        .iter()
        .filter(|p| !pids.contains(&p.1))
        .map(|p| p.0)
        .collect();
    postmasters.sort_unstable();
    Some(PostgresCpu {
        ticks: processes.iter().map(|p| p.2).sum(),
        postmasters,
    })
}

/// The parent pid (field 4) of a `/proc/PID/stat` line.
fn parse_parent(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident memory of a process in MiB, from `VmRSS` in `/proc/PID/status`.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The summed RSS of several processes in MiB (Durin's nodes); `None` when one of them
/// cannot be read.
pub fn rss_sum_mib(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&pid| rss_mib(pid)).sum()
}

/// The largest summed RSS of some processes, sampled by a tokio task at a fixed interval
/// from [`RssPeak::start`] until [`RssPeak::stop`]. Dropping it without `stop` (a level
/// that failed) drops the sender too, which ends the task as well.
pub struct RssPeak {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Option<f64>>,
}

impl RssPeak {
    /// Starts sampling the summed RSS of `pids` every `every`, the first sample at once.
    pub fn start(pids: Vec<u32>, every: Duration) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            // A late tick (the runtime is busy with the callers) is taken late, not caught up.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut peak = None;
            loop {
                tokio::select! {
                    _ = &mut stopped => return peak,
                    _ = interval.tick() => peak = max_of(peak, rss_sum_mib(&pids)),
                }
            }
        });
        RssPeak { stop, task }
    }

    /// Stops the sampling and returns the largest sample; `None` when none could be read.
    pub async fn stop(self) -> Option<f64> {
        // The task ends on the message, or has ended already if it panicked.
        let _ = self.stop.send(());
        self.task.await.ok().flatten()
    }
}

/// The larger of two optional figures; either when the other is missing.
pub fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The soft and hard limits on open files of this process (`ulimit -n` and `ulimit -Hn`),
/// which the children inherit, from `/proc/self/limits`; `u64::MAX` stands for unlimited.
/// The workspace forbids unsafe code, so `getrlimit` is out of reach.
pub fn open_files_limits() -> Result<(u64, u64)> {
    let path = "/proc/self/limits";
    let limits = fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    parse_open_files_limits(&limits)
        .ok_or_else(|| anyhow!("no \"Max open files\" line in {path}: {limits:?}"))
}

/// The soft and hard limits of the `Max open files` line of a `/proc/PID/limits` text.
fn parse_open_files_limits(limits: &str) -> Option<(u64, u64)> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut values = rest.split_whitespace();
    let mut limit = || match values.next()? {
        "unlimited" => Some(u64::MAX),
        value => value.parse().ok(),
    };
    Some((limit()?, limit()?))
}

/// Clock ticks per second for `/proc/PID/stat`. The workspace forbids unsafe code and
/// libc is not a dependency, so this asks `getconf CLK_TCK`; if that fails it assumes
/// 100, which is the value on every Linux architecture in common use.
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

/// The 1-minute load average from `/proc/loadavg`.
pub fn loadavg1() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks_after_a_tricky_command_name() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn parses_the_command_name_and_the_children_times() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 75 7 3 20 0 3 0";
        assert_eq!(parse_comm(stat), Some("a) b (c)"));
        assert_eq!(parse_parent(stat), Some(1));
        assert_eq!(parse_times(stat), Some([250, 75, 7, 3]));
    }

    #[test]
    fn postgres_ticks_compare_only_within_one_server() {
        let before = PostgresCpu {
            ticks: 100,
            postmasters: vec![7],
        };
        let after = PostgresCpu {
            ticks: 250,
            postmasters: vec![7],
        };
        let restarted = PostgresCpu {
            ticks: 300,
            postmasters: vec![9],
        };
        assert_eq!(before.ticks_until(&after), Some(150));
        assert_eq!(before.ticks_until(&restarted), None);
    }

    #[test]
    fn the_larger_of_two_optional_figures() {
        assert_eq!(max_of(Some(1.0), Some(2.5)), Some(2.5));
        assert_eq!(max_of(Some(3.0), None), Some(3.0));
        assert_eq!(max_of(None, Some(4.0)), Some(4.0));
        assert_eq!(max_of(None, None), None);
    }

    #[tokio::test]
    async fn samples_the_peak_rss_of_this_process() {
        let peak = RssPeak::start(vec![std::process::id()], Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(peak.stop().await.is_some_and(|mib| mib > 0.0));
    }

    #[test]
    fn parses_the_open_files_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 20000                files     \n\
                      Max locked memory         8388608              8388608              bytes     \n";
        assert_eq!(parse_open_files_limits(limits), Some((1024, 20000)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(
            parse_open_files_limits(unlimited),
            Some((u64::MAX, u64::MAX))
        );
        assert_eq!(
            parse_open_files_limits("Max processes 10 10 processes\n"),
            None
        );
    }

    #[test]
    fn reads_own_open_files_limits() {
        let (soft, hard) = open_files_limits().unwrap();
        assert!(soft <= hard);
    }

    #[test]
    fn reads_own_cpu_ticks() {
        assert!(cpu_ticks(std::process::id()).is_ok());
    }
}
