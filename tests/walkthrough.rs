//! The README's walk-through, run as written: every shell block that a `<!-- walkthrough -->`
//! comment marks, in the README's order, in one `bash` (as one terminal would), against
//! `examples/order/demo.sh` running beside it (as the other terminal would).
//!
//! Everything runs in a scratch directory laid out like the repository where the
//! walk-through is run: `target/debug/durin` and `target/debug/order` (links to the binaries
//! `cargo test` built), `examples/order/demo.sh` (a link to the real script),
//! `examples/durin.toml` (the real file, with its deployment url moved to this test's order
//! port) and a `cargo` on `PATH` that only notes its arguments (`cargo test` built
//! everything already). The ports are free ones, given through the variables the README
//! and `demo.sh` read (`DURIN_URL`, `DURIN_ADMIN_URL`, `ORDER_LISTEN`, and durin's own
//! `DURIN_LISTEN` and `DURIN_ADMIN_LISTEN`); `STEP_DELAY_MS=1000` shortens the demo's steps.
//!
//! A block passes when no command in it fails (an `ERR` trap notes any that does) and its
//! output holds each text its marker names (`<!-- walkthrough: prints `TEXT` ... -->`);
//! every fired timer a block's output shows (a journal's `sleep` entry with its completion)
//! must have fired at or after its due time, and at least one must be shown. Then `demo.sh` must have ended by itself (the walk-through killed both processes it had
//! started) and nothing may listen on the walk-through's ports any more (its last block
//! stops what it started); last, a second `demo.sh` must stop both its processes on Ctrl-C
//! (SIGINT to its process group, as a terminal sends it). Every process the test starts is
//! in one of its process groups, killed by id with SIGKILL when the test ends, passed or
//! failed.
//!
//! Needs `bash`, `curl` and `python3` (the walk-through's tools); skips without them unless
//! `DURIN_REQUIRE_ALL=1`.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// The start of the comment that marks a walk-through block.
const MARKER: &str = "<!-- walkthrough";
/// The line the shell prints after each block, with the block's number and whether a
/// command failed.
const DONE: &str = "__WALKTHROUGH_DONE__";
const FAILED: &str = "__WALKTHROUGH_FAILED__";
/// How long one block may take (the longest waits 15 s while no Durin runs).
const BLOCK_LIMIT: Duration = Duration::from_secs(90);

/// A marked shell block of the README.
struct Block {
    /// Line of the block's first command in README.md (1-based), for messages.
    line: usize,
    /// Texts the block's output must hold.
    prints: Vec<String>,
    script: String,
}

/// The marked blocks of `readme`, in order. A marker must be followed by a ```sh block.
fn walkthrough_blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        i += 1;
        if !line.starts_with(MARKER) {
            continue;
        }
        let inner = line
            .strip_prefix(MARKER)
            .and_then(|rest| rest.strip_suffix("-->"))
            .unwrap_or_else(|| panic!("README.md:{i}: a walkthrough marker ends on its line"));
        // The texts between backticks: the odd pieces of a split on '`'.
        let prints = inner
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        assert_eq!(
            lines.get(i).copied().map(str::trim),
            Some("```sh"),
            "README.md:{}: a walkthrough marker must be followed by a ```sh block",
            i + 1
        );
        i += 1;
        let start = i;
        let mut script = String::new();
        while i < lines.len() && lines[i].trim() != "```" {
            script.push_str(lines[i]);
            script.push('\n');
            i += 1;
        }
        assert!(i < lines.len(), "README.md:{start}: the block never ends");
        i += 1;
        blocks.push(Block {
            line: start + 1,
            prints,
            script,
        });
    }
    blocks
}

/// A process the test started in a process group of its own, with whatever it starts in
/// the background: the whole group is killed (SIGKILL, by its id) when dropped.
struct Group {
    child: Child,
    /// Whether the leader was reaped: its id may then name another group, so the group is
    /// signalled only while a process of it is still there.
    reaped: bool,
}

impl Group {
    fn spawn(mut command: Command) -> Group {
        command.process_group(0);
        let child = command.spawn().expect("spawn");
        Group {
            child,
            reaped: false,
        }
    }

    /// Sends `signal` ("INT", "KILL") to every process of the group; false when none is left.
    fn signal(&self, signal: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Whether a process of the group is still there.
    fn alive(&self) -> bool {
        self.signal("0")
    }

    /// Waits at most `limit` for the leader to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.reaped = true;
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // While the leader is not reaped, its id cannot name another group.
        if !self.reaped || self.alive() {
            self.signal("KILL");
        }
        let _ = self.child.wait();
    }
}

/// Three ports free right now, for Durin's two listeners and the order service.
fn free_ports() -> [u16; 3] {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    let port = |i: usize| listeners[i].local_addr().unwrap().port();
    [port(0), port(1), port(2)]
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// The scratch repository: links to the binaries, to `demo.sh` and what it sources, the config with this
/// test's order port, and the note-taking `cargo`.
fn lay_out(root: &Path, repo: &Path, order_port: u16) {
    let dir = |path: &str| std::fs::create_dir_all(root.join(path)).unwrap();
    dir("target/debug");
    dir("examples/order");
    dir("bin");
    let link = |target: &Path, path: &str| {
        std::os::unix::fs::symlink(target, root.join(path)).unwrap();
    };
    link(Path::new(env!("CARGO_BIN_EXE_durin")), "target/debug/durin");
    link(&support::order_binary(), "target/debug/order");
    link(
        &repo.join("examples/order/demo.sh"),
        "examples/order/demo.sh",
    );
    link(
        &repo.join("examples/demo-processes.sh"),
        "examples/demo-processes.sh",
    );

    let config = std::fs::read_to_string(repo.join("examples/durin.toml")).unwrap();
    let documented = "url = \"http://127.0.0.1:9080\"";
    assert!(
        config.contains(documented),
        "examples/durin.toml no longer registers the order service with {documented}; \
         update this test"
    );
    let config = config.replace(
        documented,
        &format!("url = \"http://127.0.0.1:{order_port}\""),
    );
    std::fs::write(root.join("examples/durin.toml"), config).unwrap();

    let cargo = root.join("bin/cargo");
    std::fs::write(
        &cargo,
        "#!/bin/sh\n# cargo test built durin and the order example already: only note the call.\n\
         echo \"$*\" >>\"$(dirname \"$0\")/cargo-calls\"\n",
    )
    .unwrap();
    let chmod = Command::new("chmod")
        .arg("+x")
        .arg(&cargo)
        .status()
        .unwrap();
    assert!(chmod.success());
}

/// The environment of `demo.sh` and of the walk-through's shell: no `DURIN_*` of the
/// caller's, the test's addresses, the note-taking `cargo` first on `PATH`.
fn environment(command: &mut Command, root: &Path, ports: [u16; 3]) {
    let [main, admin, order] = ports;
    for (key, _) in std::env::vars() {
        if key.starts_with("DURIN_") {
            command.env_remove(key);
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    command
        .current_dir(root)
        .env("PATH", format!("{}:{path}", root.join("bin").display()))
        .env("DURIN_URL", format!("http://127.0.0.1:{main}"))
        .env("DURIN_ADMIN_URL", format!("http://127.0.0.1:{admin}"))
        .env("ORDER_LISTEN", format!("127.0.0.1:{order}"))
        .env("DURIN_LISTEN", format!("127.0.0.1:{main}"))
        .env("DURIN_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("STEP_DELAY_MS", "1000");
}

/// Starts `examples/order/demo.sh`, its output going to `log`, and waits until it says it
/// is ready. It starts with SIGINT's default action, as in a terminal (a process that
/// inherits SIGINT ignored, as background jobs of a script do, could not trap Ctrl-C).
fn start_demo(root: &Path, ports: [u16; 3], log: &Path) -> Group {
    let out = std::fs::File::create(log).unwrap();
    let mut command = Command::new("python3");
    command
        .arg("-c")
        .arg(
            "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); \
             os.execv(sys.argv[1], sys.argv[1:])",
        )
        .arg(root.join("examples/order/demo.sh"));
    environment(&mut command, root, ports);
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut demo = Group::spawn(command);
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("demo: ready") {
            return demo;
        }
        if let Some(status) = demo.child.try_wait().unwrap() {
            demo.reaped = true;
            panic!("demo.sh ended ({status}) before it was ready:\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo.sh was not ready within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the scratch directory's logs say, for a failure's message.
fn logs(root: &Path) -> String {
    let mut out = String::new();
    for name in ["demo.log", "target/demo/order.log", "target/demo/durin.log"] {
        if let Ok(text) = std::fs::read_to_string(root.join(name)) {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("\n--- {name} (last lines) ---\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Every completed timer in `output` (a journal's `sleep` entries) fired at or after its
/// due time: "late but never early". Returns how many it checked.
fn timers_not_early(output: &str) -> usize {
    let mut checked = 0;
    for entry in output.split("{\"index\":").skip(1) {
        let Some(rest) = entry
            .split("\"kind\":\"sleep\",\"value\":{\"wake_at_ms\":")
            .nth(1)
        else {
            continue;
        };
        let Some(at) = entry.split("\"completion\":{").nth(1) else {
            continue;
        };
        let due: u64 = rest
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap();
        let fired = at
            .split("\"at\":\"")
            .nth(1)
            .and_then(|t| t.split('"').next())
            .unwrap();
        let fired = humantime::parse_rfc3339(fired)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(
            fired >= u128::from(due),
            "a timer due at {due} ms fired early, at {fired} ms: {entry}"
        );
        checked += 1;
    }
    checked
}

/// The walk-through's terminal: one `bash` that runs the blocks one after the other.
struct Shell {
    group: Group,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Shell {
    fn start(root: &Path, ports: [u16; 3]) -> Shell {
        let mut command = Command::new("bash");
        command.args(["--noprofile", "--norc"]);
        environment(&mut command, root, ports);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut group = Group::spawn(command);
        let mut stdin = group.child.stdin.take().unwrap();
        let stdout = group.child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // Everything on stdout, in order; a failing command is noted, and the block goes on
        // as it would in a terminal.
        let prelude = format!(
            "exec 2>&1\nset -o pipefail\n\
             trap 'printf \"\\n{FAILED} status %s: %s\\n\" \"$?\" \"$BASH_COMMAND\"; __failed=1' ERR\n"
        );
        stdin.write_all(prelude.as_bytes()).unwrap();
        Shell {
            group,
            stdin,
            lines,
        }
    }

    /// Runs block `n` from its file; returns its output and whether a command failed.
    fn run(&mut self, n: usize, file: &str) -> (String, bool) {
        let command =
            format!("__failed=0\nsource {file}\nprintf '\\n{DONE} {n} %s\\n' \"$__failed\"\n");
        self.stdin.write_all(command.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let start = Instant::now();
        let mut output = String::new();
        loop {
            let left = BLOCK_LIMIT.saturating_sub(start.elapsed());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!(
                    "block {n} did not finish within {BLOCK_LIMIT:?} (or the shell ended); \
                     its output so far:\n{output}"
                ),
            };
            if let Some(rest) = line.strip_prefix(&format!("{DONE} {n} ")) {
                return (output, rest.trim() != "0");
            }
            output.push_str(&line);
            output.push('\n');
        }
    }
}

#[test]
fn readme_walkthrough_runs_as_written() {
    if !(support::require("bash") && support::require("curl") && support::require("python3")) {
        return;
    }
    let started = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let blocks = walkthrough_blocks(&readme);
    assert!(
        blocks.len() >= 10,
        "README.md marks {} walkthrough blocks; expected the whole walk-through (10 or more)",
        blocks.len()
    );

    let scratch = tempfile::tempdir().unwrap();
    let root: PathBuf = scratch.path().to_owned();
    let ports = free_ports();
    let [main_port, admin_port, order_port] = ports;
    lay_out(&root, repo, order_port);

    // The first terminal.
    let demo_log = root.join("demo.log");
    let mut demo = start_demo(&root, ports, &demo_log);
    let said = std::fs::read_to_string(&demo_log).unwrap();
    for text in [
        "demo: building durin and the order example".to_owned(),
        format!("demo: starting the order service on http://127.0.0.1:{order_port}"),
        format!("callers on http://127.0.0.1:{main_port}"),
        format!("operators (admin API, web UI) on http://127.0.0.1:{admin_port}"),
        "target/demo/order.pid and target/demo/durin.pid".to_owned(),
        "Ctrl-C here stops both".to_owned(),
    ] {
        assert!(
            said.contains(&text),
            "demo.sh did not say {text:?}:\n{said}"
        );
    }
    let cargo_calls = std::fs::read_to_string(root.join("bin/cargo-calls")).unwrap_or_default();
    assert!(
        cargo_calls.starts_with("build ")
            && cargo_calls.contains("-p durin ")
            && cargo_calls.contains("-p order-example"),
        "demo.sh should build durin and the order example; cargo was called with {cargo_calls:?}"
    );
    for file in ["order.pid", "durin.pid"] {
        assert!(
            root.join("target/demo").join(file).exists(),
            "demo.sh wrote no target/demo/{file}"
        );
    }

    // The second terminal: each block, in order.
    let mut shell = Shell::start(&root, ports);
    let mut timers_checked = 0;
    std::fs::create_dir_all(root.join(".walkthrough")).unwrap();
    for (n, block) in blocks.iter().enumerate() {
        let file = format!(".walkthrough/block-{n}.sh");
        std::fs::write(root.join(&file), &block.script).unwrap();
        let block_started = Instant::now();
        let (output, failed) = shell.run(n, &file);
        println!(
            "=== block {n} (README.md:{}), {:.1} s\n{}--- output\n{output}",
            block.line,
            block_started.elapsed().as_secs_f64(),
            block.script
        );
        let context = || {
            format!(
                "block {n} at README.md:{}:\n{}\n--- its output:\n{output}{}",
                block.line,
                block.script,
                logs(&root)
            )
        };
        assert!(!failed, "a command failed in {}", context());
        for text in &block.prints {
            assert!(
                output.contains(text.as_str()),
                "{text:?} is not in the output of {}",
                context()
            );
        }
        timers_checked += timers_not_early(&output);
    }
    assert!(
        timers_checked > 0,
        "no block showed a journal with a fired timer (the timer that survives Durin's death)"
    );

    // demo.sh ended by itself once the walk-through had killed both of its processes.
    let status = demo.wait_exit(Duration::from_secs(10));
    let said = std::fs::read_to_string(&demo_log).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "demo.sh should have ended by itself, with success ({status:?}):\n{said}"
    );
    for text in [
        "demo: the order service (pid",
        "has ended: killed by SIGKILL",
        "demo: Durin (pid",
        "nothing this script started runs any more",
    ] {
        assert!(said.contains(text), "demo.sh did not say {text:?}:\n{said}");
    }

    // The last block stopped what the walk-through started: nothing listens any more.
    let start = Instant::now();
    while ports.iter().any(|&port| listening(port)) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "something still listens on the walk-through's ports {ports:?} after its last block{}",
            logs(&root)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(shell.stdin);
    assert!(
        shell.group.wait_exit(Duration::from_secs(10)).is_some(),
        "the walk-through's shell did not end"
    );
    drop(shell.group);
    drop(demo);

    // Ctrl-C stops both processes of a demo.sh.
    let ctrl_c_log = root.join("demo-ctrl-c.log");
    let mut demo = start_demo(&root, ports, &ctrl_c_log);
    assert!(demo.signal("INT"), "no process of demo.sh to interrupt");
    let status = demo.wait_exit(Duration::from_secs(20));
    let said = std::fs::read_to_string(&ctrl_c_log).unwrap();
    assert!(status.is_some(), "demo.sh did not end on Ctrl-C:\n{said}");
    assert!(
        said.contains("demo: stopped"),
        "demo.sh did not say it stopped:\n{said}"
    );
    let start = Instant::now();
    while demo.alive() || ports.iter().any(|&port| listening(port)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a process of demo.sh outlived its Ctrl-C:\n{said}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(demo);

    println!(
        "walkthrough: {} blocks, demo.sh's end and its Ctrl-C in {:.1} s",
        blocks.len(),
        started.elapsed().as_secs_f64()
    );
}
