//! Map capacities changed in the node configuration take effect on a pinned datapath, without
//! losing what its maps hold; so does the size of the verdict counters, when an older version
//! pinned them for fewer reasons.
//!
//! A map adopted from its pin keeps the size it was created with, and the kernel cannot resize a
//! map. So a map whose configured size differs is moved aside (pinned under another name), the
//! programs are loaded with a new map of the configured size pinned in its place, and the
//! entries are copied over (see [`crate::maps::copy`]: live conntrack entries only, the least
//! recently used first). Then every program is relinked onto the new maps, one at a time (see
//! [`crate::upgrade`]), and a second pass carries over what the old programs changed meanwhile
//! (new flows, changed entries, counts) before the old maps go. Flows, affinity, counters and
//! what is programmed carry over. The cost: from the first relink until the second pass is
//! done (about a read of the old map), a reply to a flow opened during the copy may reach a
//! program on the new maps before its entries do, and pass untranslated; and a flow opened by
//! a relinked program may send its reply through one not relinked yet.
//!
//! A daemon stopped part way leaves the old map aside; the next one finishes the move, or
//! starts it afresh if no program used the new map yet.

use std::fs;

use lb_common::{maps::names, stats::Reason};
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    loader::{Capacities, MAP_NAMES},
    maps::{
        copy::{self, Copied},
        pinned_entries as entries,
    },
    pins::PinLayout,
    upgrade,
};

/// Puts back every map a stopped daemon moved aside without pinning a new one in its place:
/// before anything opens the pinned maps.
pub fn restore_unstarted(pins: &PinLayout) -> Result<()> {
    for name in MAP_NAMES {
        let (pinned, aside) = (pins.map(name), pins.map_set_aside(name));
        if aside.exists() && !pinned.exists() {
            copy::move_pin(name, &aside, &pinned)?;
        }
    }
    Ok(())
}

/// The size map `name` is to have: the configured capacity, or for the verdict counters one
/// slot per reason this version counts (an older version, counting fewer, pinned fewer; new
/// reasons are appended, so an index keeps its reason and the counts carry over).
fn wanted_entries(capacities: &Capacities, name: &str) -> Option<u32> {
    if name == names::STATS { Some(Reason::COUNT) } else { capacities.of(name) }
}

/// The maps being resized in one load.
#[must_use = "an unfinished resize leaves the old maps aside"]
pub struct Resizing {
    pins: PinLayout,
    moves: Vec<Move>,
}

/// One map moved aside for a successor of another size.
struct Move {
    name: &'static str,
    from_entries: u32,
    to_entries: u32,
    /// A move a stopped daemon began: the programs may already use the new map.
    resumed: bool,
    /// Entries the first pass wrote, and what it read.
    copied: usize,
    read: Copied,
}

impl Move {
    fn new(name: &'static str, from_entries: u32, to_entries: u32, resumed: bool) -> Self {
        Self { name, from_entries, to_entries, resumed, copied: 0, read: Copied::Complete }
    }
}

impl Resizing {
    /// Before loading: moves aside every pinned map whose size differs from `capacities`, and
    /// takes up the moves a stopped daemon left unfinished. On an error, what it moved is put
    /// back.
    pub fn begin(pins: &PinLayout, capacities: &Capacities) -> Result<Self> {
        restore_unstarted(pins)?;
        let mut resizing = Self { pins: pins.clone(), moves: Vec::new() };
        for name in MAP_NAMES {
            let Some(configured) = wanted_entries(capacities, name) else { continue };
            match resizing.judge(name, configured) {
                Ok(Some(moved)) => resizing.moves.push(moved),
                Ok(None) => {}
                Err(error) => {
                    resizing.abandon();
                    return Err(error);
                }
            }
        }
        Ok(resizing)
    }

    /// Whether map `name` moves, to `configured` entries or, resumed, to the new map a stopped
    /// daemon pinned; a move is begun (the old map pinned aside) before it is returned.
    fn judge(&self, name: &'static str, configured: u32) -> Result<Option<Move>> {
        let (pinned, aside) = (self.pins.map(name), self.pins.map_set_aside(name));
        if !pinned.exists() {
            return Ok(None);
        }
        copy::check_layout(&self.pins, name, &pinned)?;
        if aside.exists() {
            copy::check_layout(&self.pins, name, &aside)?;
            let new_map = copy::map_id(name, &pinned)?;
            if new_map == copy::map_id(name, &aside)? {
                // Stopped while moving the pin: nothing was loaded yet.
                fs::remove_file(&aside).map_err(Error::io(&aside))?;
            } else if upgrade::programs_use(new_map) {
                // Stopped once programs used the new map: copy what it lacks and relink.
                let (from_entries, to_entries) = (entries(name, &aside)?, entries(name, &pinned)?);
                return Ok(Some(Move::new(name, from_entries, to_entries, true)));
            } else {
                // Stopped before any program used the new map: start the move afresh.
                fs::remove_file(&pinned).map_err(Error::io(&pinned))?;
                copy::move_pin(name, &aside, &pinned)?;
            }
        }
        let (from_entries, to_entries) = (entries(name, &pinned)?, configured);
        if from_entries == to_entries {
            return Ok(None);
        }
        // A later version's verdict counters: this one reads the reasons it knows, the first.
        if to_entries < from_entries && name == names::STATS {
            return Ok(None);
        }
        // The maps the programs insert into are LRU maps, which make room by evicting; the
        // others hold what the daemon programmed, addressed by ids that need not fit a smaller
        // map.
        if to_entries < from_entries && !copy::programs_insert(name) {
            warn!(
                map = name,
                pinned = from_entries,
                configured = to_entries,
                "kept at its pinned size: the ids and slots in use may lie beyond a smaller one; \
                 a datapath loaded afresh (after `lb-user unload`) takes it"
            );
            return Ok(None);
        }
        copy::move_pin(name, &pinned, &aside)?;
        Ok(Some(Move::new(name, from_entries, to_entries, false)))
    }

    /// True if no map changes size: the programs may stay where they are.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// After loading, with the new maps pinned, before the programs move to them: copies the
    /// entries of the old maps into them (for a resumed move, the entries they lack).
    pub fn copy(&mut self) -> Result<()> {
        // Conntrack last, right before the programs move: a flow opened while the others are
        // copied is then in its first pass, not left to the second.
        self.moves.sort_by_key(|moved| moved.name == names::CONNTRACK);
        for moved in &mut self.moves {
            let (from, to) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            let first_pass = if moved.resumed { copy::copy_missing } else { copy::copy_all };
            (moved.copied, moved.read) = first_pass(moved.name, &from, &to)?;
        }
        Ok(())
    }

    /// Once the programs use the new maps: carries over what the old programs changed since
    /// [`Self::copy`], and lets the old maps go.
    pub fn finish(mut self) -> Result<()> {
        // Conntrack first: until its second pass is done, replies to flows opened during the
        // copy may miss their entries.
        self.moves.sort_by_key(|moved| moved.name != names::CONNTRACK);
        for moved in self.moves {
            let (from, to) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            let late = copy::copy_changes(moved.name, &from, &to, &moved.read)?;
            fs::remove_file(&from).map_err(Error::io(&from))?;
            let (name, from, to, copied, late) =
                (moved.name, moved.from_entries, moved.to_entries, moved.copied, late);
            if moved.resumed {
                info!(
                    map = name,
                    from, to, copied, late, "finished a resize a stopped daemon began"
                );
            } else {
                info!(map = name, from, to, copied, late, "resized to the configured capacity");
            }
        }
        Ok(())
    }

    /// After a failure before any program was moved to the new maps: unpins them and puts the
    /// old ones back, as they were. A resumed move stays for the next start: programs may use
    /// its new map already.
    pub fn abandon(self) {
        for moved in self.moves.into_iter().filter(|moved| !moved.resumed) {
            let (aside, pinned) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            // The new map may not be pinned yet; putting the old one back fails if it is and
            // cannot be unpinned.
            let _ = fs::remove_file(&pinned);
            if let Err(error) = copy::move_pin(moved.name, &aside, &pinned) {
                let error = crate::error::chain(&error);
                warn!(
                    map = moved.name,
                    error, "the old map is not back; the next start puts it back"
                );
            }
        }
    }
}
