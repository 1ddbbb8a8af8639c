//! A pin directory with a unique name under /sys/fs/bpf, removed on drop.

use lb_user::pins::PinLayout;

use crate::netns::unique_name;

/// Where a test pins; whatever is left there is unpinned when the test ends, passed or failed.
pub struct TestPins {
    layout: PinLayout,
}

impl TestPins {
    pub fn new() -> Self {
        Self { layout: PinLayout::new(format!("/sys/fs/bpf/{}", unique_name("lbt"))) }
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }
}

impl Default for TestPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        // Unpinning also detaches any pinned link; then remove whatever else is left.
        let _ = lb_user::attach::unload(&self.layout);
        let _ = std::fs::remove_dir_all(self.layout.root());
    }
}
