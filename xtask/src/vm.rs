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
    path::{Path, PathBuf},
    process::{Command, Stdio},
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

pub fn run() -> anyhow::Result<()> {
    let vm = target_dir().join("vm");
    let kernel = fetch_kernel(&vm)?;
    let qemu = fetch_qemu(&vm)?;
    let tests = build_tests()?;
    let out = vm.join("out");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let script = out.join("run.sh");
    fs::write(&script, runner_script(&tests, &out)).context("writing the guest's script")?;
    eprintln!("vm: booting {} under QEMU (TCG) for {} test binaries", kernel.release, tests.len());
    // vng's own exit status is not the script's here (it reports 255 when the guest has to run
    // the script on the console rather than over virtio-serial): each test's exit code is
    // read back from `results` instead, and a missing one is a failure.
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
        .arg(&out)
        .arg("--exec")
        .arg(format!("bash {}", script.display()))
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting vng (scripts/setup installs virtme-ng)")?;
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
    let status = vng.wait().context("waiting for vng")?;
    report(&tests, &out).with_context(|| format!("vng exited with {status}"))
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
    Ok(tests)
}

/// The guest's script: mount bpffs, run each test binary (one test at a time: the guest has
/// two emulated CPUs), and record each exit code and output under `out`.
fn runner_script(tests: &[(String, PathBuf)], out: &Path) -> String {
    let mut script = String::from("mount -t bpf bpf /sys/fs/bpf\n");
    let _ = writeln!(script, "cd {}", workspace_root().join("tests").display());
    for (name, executable) in tests {
        let log = out.join(format!("{name}.log"));
        let env = SCALED_DOWN.iter().find(|(test, _)| test == name).map_or("", |(_, env)| env);
        let _ = writeln!(
            script,
            "{env} {} --test-threads 1 >{} 2>&1; echo \"{name} $?\" >>{}",
            executable.display(),
            log.display(),
            out.join("results").display()
        );
    }
    script
}

/// Prints each test binary's outcome and the output of failed ones; fails unless all passed.
fn report(tests: &[(String, PathBuf)], out: &Path) -> anyhow::Result<()> {
    let results = fs::read_to_string(out.join("results")).unwrap_or_default();
    let mut failed = Vec::new();
    for (name, _) in tests {
        let code =
            results.lines().find_map(|l| l.strip_prefix(name.as_str())?.trim().parse::<i32>().ok());
        let log = fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
        let summary = log.lines().rev().find(|l| l.starts_with("test result:")).unwrap_or("");
        if code == Some(0) {
            eprintln!("vm: {name}: {summary}");
        } else {
            eprintln!("vm: {name} FAILED ({code:?})\n{log}");
            failed.push(name.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("failed on Debian's 6.1 kernel: {}", failed.join(", "));
    }
    Ok(())
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().with_context(|| format!("starting {program}"))?;
    if !output.status.success() {
        bail!("{program} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
