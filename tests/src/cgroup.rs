//! A throwaway cgroup v2 directory for host-path tests: only processes the test moves into it
//! are affected by what it attaches there. Removed on drop.

use std::path::{Path, PathBuf};

use crate::netns::unique_name;

/// The cgroup v2 mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones (like this machine's kind).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .map(|fields| PathBuf::from(fields[1]))
        .expect("a cgroup2 mount (the host path needs cgroup v2)")
}

pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        let path = cgroup2_root().join(unique_name("lbt-cgroup"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty once the test's processes have exited; rmdir is how cgroups are removed.
        let _ = std::fs::remove_dir(&self.path);
    }
}
