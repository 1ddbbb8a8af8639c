//! The VM tier: the integration tests inside QEMU on Debian 12's own 6.1 kernel, the oldest this
//! project supports and the one without tcx (the tc programs attach through clsact and
//! cls_bpf there). virtme-ng boots the kernel on this machine's root filesystem (read-only,
//! over 9p), so the test binaries built here run unchanged; QEMU emulates the CPU (TCG),
//! because nested KVM is not dependable on the machines this runs on.
//!
//! Fetched from Debian's archive with `apt-get download` and unpacked under `target/vm`: the
//! kernel package (its modules are copied to `/lib/modules/<release>`, where the guest's
//! modprobe looks) and QEMU's packages (not installed: see `scripts/setup`).

use std::{
    fmt::Write as _,
    fs, io,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{run_in, target_dir, workspace_root};

/// Debian's 6.1 kernels, newest ABI first after sorting.
const KERNEL_PACKAGES: &str = r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$";
const QEMU_PACKAGES: [&str; 5] =
    ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios", "ipxe-qemu"];
/// Environment for tests that scale down under emulation: a million random packets per program
/// would take most of an hour, a tenth of that about a minute.
const SCALED_DOWN: [(&str, &str); 1] = [("robustness", "LB_ROBUSTNESS_PACKETS=100000")];
/// The guest's memory: the tests load maps of a few hundred MiB.
const GUEST_MEMORY: &str = "3G";
/// The longest one test binary may run in the guest before it is killed. The slowest takes
/// about two minutes under emulation; one that hangs must be named, not run into CI's own
/// limit with nothing said.
const TEST_BINARY_LIMIT: Duration = Duration::from_mins(10);
/// How long the guest may go without finishing a binary (timeout(1) ends one at its limit)
/// before QEMU is killed: a guest kernel or process that even SIGKILL cannot end stops here.
const GUEST_STALL_LIMIT: Duration = TEST_BINARY_LIMIT.saturating_add(Duration::from_mins(2));
/// The longest one guest may run: every binary at its usual pace and one at its limit, with
/// room to spare, and with a second guest for binaries that hung, within CI's 90 minutes.
const GUEST_LIMIT: Duration = Duration::from_mins(35);
/// How long the guest may take to power off after its last binary: a guest that does not is
/// killed and the tier goes on to its report.
const POWER_OFF_GRACE: Duration = Duration::from_mins(2);

pub fn run() -> anyhow::Result<()> {
    let vm = target_dir().join("vm");
    let guest = Guest { kernel: fetch_kernel(&vm)?, qemu: fetch_qemu(&vm)? };
    let tests = build_tests()?;
    let outcomes = guest.run(&tests, &vm.join("out"))?;
    let mut failed = report(&outcomes);
    // A CI run once hung in this tier with nothing to say why. A binary that does not finish
    // (stopped by timeout(1), or cut off with its guest) gets one fresh guest, and fails only
    // if it does not pass there; both runs are printed.
    let hung: Vec<_> =
        tests.iter().zip(&outcomes).filter(|(_, o)| o.hung()).map(|(t, _)| t.clone()).collect();
    if !hung.is_empty() {
        let names: Vec<_> = hung.iter().map(|(name, _)| name.as_str()).collect();
        eprintln!("vm: {} did not finish: once more in a fresh guest", names.join(", "));
        failed.retain(|name| !names.contains(&name.as_str()));
        failed.extend(report(&guest.run(&hung, &vm.join("out-again"))?));
    }
    if !failed.is_empty() {
        bail!("failed on Debian's 6.1 kernel: {}", failed.join(", "));
    }
    Ok(())
}

struct Guest {
    kernel: Kernel,
    qemu: PathBuf,
}

impl Guest {
    /// Boots the guest to run `tests` with `out` as its shared directory; their outcomes.
    fn run(&self, tests: &[(String, PathBuf)], out: &Path) -> anyhow::Result<Vec<Outcome>> {
        let Self { kernel, qemu } = self;
        let _ = fs::remove_dir_all(out);
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let script = out.join("run.sh");
        fs::write(&script, runner_script(tests, out)).context("writing the guest's script")?;
        eprintln!(
            "vm: booting {} under QEMU (TCG) for {} test binaries",
            kernel.release,
            tests.len()
        );
        // vng's own exit status is not the script's here (it reports 255 when the guest has to
        // run the script on the console rather than over virtio-serial): each test's exit code
        // is read back from `results` instead, and a missing one is a failure.
        // vng's guest console reopens the output it is given and truncates it: with the output
        // of `scripts/test > log 2>&1` a file, everything before the VM tier was lost. Pipes,
        // copied here, cannot be truncated.
        let mut vng = Command::new("vng")
            .arg("--run")
            .arg(&kernel.image)
            .arg("--qemu")
            .arg(qemu.join("usr/bin/qemu-system-x86_64"))
            .arg(format!("--qemu-opts=-L {}", qemu.join("usr/share/qemu").display()))
            .args(["--force-9p", "--disable-kvm", "--memory", GUEST_MEMORY, "--cpus", "2"])
            .arg("--rwdir")
            .arg(out)
            .arg("--exec")
            .arg(format!("bash {}", script.display()))
            .current_dir(workspace_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so the watch can kill QEMU with it.
            .process_group(0)
            .spawn()
            .context("starting vng (scripts/setup installs virtme-ng)")?;
        let watch = watch_guest(vng.id(), out.to_owned(), tests.len());
        let errors = vng
            .stderr
            .take()
            .map(|mut errors| std::thread::spawn(move || io::copy(&mut errors, &mut io::stderr())));
        if let Some(mut console) = vng.stdout.take() {
            io::copy(&mut console, &mut io::stdout()).context("copying vng's output")?;
        }
        if let Some(copying) = errors {
            let _ = copying.join();
        }
        vng.wait().context("waiting for vng")?;
        watch.finish();
        Ok(outcomes(tests, out))
    }
}

/// Follows the guest from the host until told it is gone: prints each line the guest's script
/// appends to `out/progress` (the guest's console does not reach this output), and kills the
/// process group `leader` leads when the guest runs past `GUEST_LIMIT`, stalls for
/// `GUEST_STALL_LIMIT`, or has not powered off `POWER_OFF_GRACE` after its last binary. The
/// report then names what did not finish.
fn watch_guest(leader: u32, out: PathBuf, binaries: usize) -> GuestWatch {
    let (finished, done) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let started = Instant::now();
        let mut printed = 0;
        let mut progress_at = Instant::now();
        let mut last_binary_at = None;
        loop {
            let gone =
                done.recv_timeout(Duration::from_secs(2)) != Err(mpsc::RecvTimeoutError::Timeout);
            let progress = fs::read_to_string(out.join("progress")).unwrap_or_default();
            for line in progress.lines().skip(printed) {
                eprintln!("{line}");
                printed += 1;
                progress_at = Instant::now();
            }
            if gone {
                return;
            }
            let results = fs::read_to_string(out.join("results")).unwrap_or_default();
            if results.lines().count() >= binaries && last_binary_at.is_none() {
                last_binary_at = Some(Instant::now());
            }
            let stuck = if started.elapsed() > GUEST_LIMIT {
                format!("ran longer than {GUEST_LIMIT:?}")
            } else if progress_at.elapsed() > GUEST_STALL_LIMIT {
                format!("made no progress for {GUEST_STALL_LIMIT:?}")
            } else if last_binary_at.is_some_and(|at| at.elapsed() > POWER_OFF_GRACE) {
                format!("did not power off within {POWER_OFF_GRACE:?} of its last test")
            } else {
                continue;
            };
            eprintln!("vm: the guest {stuck}: killing QEMU");
            let group = -libc::pid_t::try_from(leader).unwrap_or(libc::pid_t::MAX);
            // SAFETY: kill(2) with a negative pid signals that process group; no memory
            // is involved.
            unsafe { libc::kill(group, libc::SIGKILL) };
            return;
        }
    });
    GuestWatch { finished, thread }
}

struct GuestWatch {
    finished: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl GuestWatch {
    /// Tells the watch the guest is gone and waits until it has printed the last progress.
    fn finish(self) {
        let _ = self.finished.send(());
        let _ = self.thread.join();
    }
}

struct Kernel {
    release: String,
    image: PathBuf,
}

/// Downloads and unpacks the newest Debian 6.1 kernel, and installs its modules for the guest.
fn fetch_kernel(vm: &Path) -> anyhow::Result<Kernel> {
    let search =
        output(Command::new("apt-cache").args(["search", "--names-only", KERNEL_PACKAGES]))?;
    let mut packages: Vec<&str> =
        search.lines().filter_map(|l| l.split_whitespace().next()).collect();
    packages.sort_by_key(|name| abi_number(name));
    let Some(package) = packages.last() else {
        bail!("no package matches {KERNEL_PACKAGES}: is this Debian 12 with its main archive?");
    };
    let release =
        package.trim_start_matches("linux-image-").trim_end_matches("-unsigned").to_owned();
    let root = unpack(vm, package)?;
    let image = root.join(format!("boot/vmlinuz-{release}"));
    let modules = Path::new("/lib/modules").join(&release);
    if !modules.join("modules.dep").exists() {
        eprintln!("vm: installing the modules of {release} to {}", modules.display());
        // A machine without a kernel package of its own (a container's, a VM's booted from
        // outside) may have no /lib/modules at all.
        let parent = modules.parent().expect("/lib/modules");
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        run_in(
            Command::new("cp").args(["-a", "--no-target-directory"]),
            &[
                &root.join("lib/modules").join(&release).to_string_lossy(),
                &modules.to_string_lossy(),
            ],
        )?;
        run_in(&mut Command::new("depmod"), &[&release])?;
    }
    Ok(Kernel { release, image })
}

/// `linux-image-6.1.0-47-amd64-unsigned` -> 47.
fn abi_number(package: &str) -> u32 {
    package
        .trim_start_matches("linux-image-6.1.0-")
        .split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn fetch_qemu(vm: &Path) -> anyhow::Result<PathBuf> {
    let mut root = PathBuf::new();
    for package in QEMU_PACKAGES {
        root = unpack(vm, package)?;
    }
    Ok(root)
}

/// Downloads `package` into `vm/debs` (once) and unpacks it into `vm/root-<package>`, or into
/// the shared QEMU root for QEMU's packages; returns the directory it was unpacked into.
fn unpack(vm: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let debs = vm.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let root = if QEMU_PACKAGES.contains(&package) { vm.join("qemu") } else { vm.join(package) };
    let stamp = root.join(format!(".unpacked-{package}"));
    if stamp.exists() {
        return Ok(root);
    }
    if find_deb(&debs, package)?.is_none() {
        eprintln!("vm: downloading {package}");
        let download = |dir: &Path| {
            Command::new("apt-get")
                .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
                .current_dir(dir)
                .status()
        };
        if !download(&debs).context("starting apt-get")?.success() {
            run_in(&mut Command::new("apt-get"), &["update", "-qq"])?;
            if !download(&debs).context("starting apt-get")?.success() {
                bail!("apt-get download {package} failed");
            }
        }
    }
    let deb =
        find_deb(&debs, package)?.with_context(|| format!("{package}'s .deb after download"))?;
    run_in(
        &mut Command::new("dpkg-deb"),
        &["-x", &deb.to_string_lossy(), &root.to_string_lossy()],
    )?;
    fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
    Ok(root)
}

fn find_deb(dir: &Path, package: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with(&prefix) && path.extension().is_some_and(|e| e == "deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// (test name, executable) of every integration test of lb-tests.
fn build_tests() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let messages = output(
        Command::new("cargo")
            .args(["test", "--package", "lb-tests", "--tests", "--no-run", "--message-format=json"])
            .current_dir(workspace_root()),
    )?;
    let mut tests = Vec::new();
    for line in messages.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let is_test = message["reason"] == "compiler-artifact"
            && message["target"]["kind"] == serde_json::json!(["test"]);
        let (Some(name), Some(executable)) =
            (message["target"]["name"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        if is_test {
            tests.push((name.to_owned(), PathBuf::from(executable)));
        }
    }
    if tests.is_empty() {
        bail!("cargo built no integration tests of lb-tests");
    }
    // For a developer chasing one failure: `LB_VM_TESTS=upgrade,smoke cargo xtask vm`.
    if let Ok(wanted) = std::env::var("LB_VM_TESTS") {
        let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
        tests.retain(|(name, _)| wanted.contains(&name.as_str()));
        if tests.is_empty() {
            bail!("LB_VM_TESTS names no integration test of lb-tests: {wanted:?}");
        }
    }
    Ok(tests)
}

/// The guest's script: mount bpffs, run each test binary (one test at a time: the guest has
/// two emulated CPUs) under `TEST_BINARY_LIMIT`, record each exit code and output under `out`,
/// and note each start and end in `progress`, which the host prints as it comes, so a log cut
/// short still shows how far the tier got.
/// A failed binary's log ends with the guest's state: processes stuck in the kernel (which
/// even timeout's SIGKILL cannot end), its memory and the kernel's messages.
fn runner_script(tests: &[(String, PathBuf)], out: &Path) -> String {
    let mut script = format!(
        r#"mount -t bpf bpf /sys/fs/bpf
cd {tests}
run_test() {{
    name=$1 log=$2
    shift 2
    start=$SECONDS
    kernel_lines=$(dmesg | wc -l)
    echo "vm: $name started" >>{progress}
    timeout --kill-after=10 {limit} "$@" --test-threads 1 >"$log" 2>&1
    code=$?
    echo "$name $code" >>{results}
    echo "vm: $name exited $code after $((SECONDS - start)) s" >>{progress}
    if [ "$code" -ne 0 ]; then
        {{
            echo "--- the guest after $name: processes in uninterruptible sleep"
            ps -eo pid,stat,wchan:32,args | awk '$2 ~ /D/'
            echo "--- the guest's memory"
            free -m
            echo "--- the guest's kernel log while it ran"
            dmesg | tail -n +$((kernel_lines + 1)) | tail -n 60
        }} >>"$log" 2>&1
    fi
}}
"#,
        tests = workspace_root().join("tests").display(),
        limit = TEST_BINARY_LIMIT.as_secs(),
        results = out.join("results").display(),
        progress = out.join("progress").display(),
    );
    for (name, executable) in tests {
        let log = out.join(format!("{name}.log"));
        let env = SCALED_DOWN
            .iter()
            .find(|(test, _)| test == name)
            .map_or(String::new(), |(_, env)| format!("env {env} "));
        let _ = writeln!(script, "run_test {name} {} {env}{}", log.display(), executable.display());
    }
    script
}

/// One test binary's run in the guest: its exit code (none if the guest never wrote one) and
/// its output.
struct Outcome {
    name: String,
    code: Option<i32>,
    log: String,
}

impl Outcome {
    /// Stopped by timeout(1) (124 after its TERM, 137 after its KILL), or never finished.
    fn hung(&self) -> bool {
        matches!(self.code, None | Some(124 | 137))
    }
}

/// The outcome of each of `tests`, from what the guest left in `out`.
fn outcomes(tests: &[(String, PathBuf)], out: &Path) -> Vec<Outcome> {
    let results = fs::read_to_string(out.join("results")).unwrap_or_default();
    let code_of = |name: &str| {
        results.lines().find_map(|line| {
            let (binary, code) = line.split_once(' ')?;
            (binary == name).then(|| code.trim().parse().ok()).flatten()
        })
    };
    tests
        .iter()
        .map(|(name, _)| Outcome {
            name: name.clone(),
            code: code_of(name),
            log: fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default(),
        })
        .collect()
}

/// Prints each test binary's outcome, with the output of those that failed; their names.
fn report(outcomes: &[Outcome]) -> Vec<String> {
    let mut failed = Vec::new();
    for outcome @ Outcome { name, code, log } in outcomes {
        match code {
            Some(0) => {
                let summary = log.lines().rev().find(|l| l.starts_with("test result:"));
                eprintln!("vm: {name}: {}", summary.unwrap_or_default());
                continue;
            }
            None => eprintln!("vm: {name} DID NOT FINISH"),
            Some(_) if outcome.hung() => {
                eprintln!("vm: {name} TIMED OUT after {TEST_BINARY_LIMIT:?}");
            }
            Some(code) => eprintln!("vm: {name} FAILED (exit code {code})"),
        }
        eprintln!("{log}");
        failed.push(name.clone());
    }
    failed
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().with_context(|| format!("starting {program}"))?;
    if !output.status.success() {
        bail!("{program} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
