//! The write-ahead log's upkeep, on a thread of its own: checkpoints, and zeros kept ahead
//! of the log's end.
//!
//! A commit that makes the log file longer pays for its new length as well as its frames:
//! on ext4 here a sync that extended a file took 268-374 µs, one that overwrote written
//! blocks 181-209 µs. A fresh log (every start of Durin) grows with each commit until it
//! first starts over, so the first 64 MiB of commits would pay the longer fsync. The thread
//! writes zeros past the log's end, a piece at a time, before the writer needs the room, as
//! PostgreSQL fills its WAL segments ahead. Zeros are never a valid frame (a frame carries
//! the log's salt and a checksum), so recovery stops where the log's real frames end.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;

/// How often the write-ahead log is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// The length of the write-ahead log (in pages) past which the writer restarts it.
const WAL_RESTART_FRAMES: i64 = 16 * 1024;
/// The size the write-ahead log is truncated to when it starts over.
pub(super) const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// How far past the log's last frame (as of the latest checkpoint) the zeros reach; the
/// writer may still outrun them for a moment, and then grows the file as it did before.
const ZEROS_AHEAD: u64 = 16 * 1024 * 1024;
/// The zeros written (and synced) at once, while the writer waits.
const ZEROS_PIECE: usize = 128 * 1024;
/// The WAL header's bytes, before the first frame.
const WAL_HEADER: u64 = 32;
/// A frame's header, before its page.
const FRAME_HEADER: u64 = 24;

/// Held by the writer while it commits (SQLite writes the log then) and by the checkpointer
/// while it writes zeros past the log's end, so that the two never write the same bytes.
pub(super) type WalLock = Arc<Mutex<()>>;

/// Takes the [`WalLock`], whatever a panic left.
pub(super) fn hold(lock: &WalLock) -> std::sync::MutexGuard<'_, ()> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Copies the write-ahead log into the database file every [`CHECKPOINT_EVERY`], without
/// blocking the writer (`PASSIVE`), until the store is dropped, and keeps zeros ahead of
/// the log's end. Under a steady stream of writes a passive checkpoint never catches up
/// with the end of the log, so the log could not start over and would grow without bound
/// (1.5 GB for 100,000 workflows started in a burst); past [`WAL_RESTART_FRAMES`] it asks
/// the writer to restart the log.
pub(super) fn checkpoint_loop(
    conn: Connection,
    wal_path: String,
    lock: WalLock,
    stop: std::sync::mpsc::Receiver<()>,
    restart: Arc<AtomicBool>,
) {
    let frame_bytes = conn
        .query_row("PRAGMA page_size", [], |row| row.get::<_, u64>(0))
        .map(|page| page + FRAME_HEADER)
        .ok();
    // The first pass waits too: a start (a recovery) has the writer to itself meanwhile.
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        // (busy, frames in the log, frames copied into the database)
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(1)
        }) {
            Ok(frames) => {
                if frames > WAL_RESTART_FRAMES {
                    restart.store(true, Ordering::Relaxed);
                }
                if let Some(frame_bytes) = frame_bytes {
                    let end = WAL_HEADER + u64::try_from(frames).unwrap_or(0) * frame_bytes;
                    let wanted = (end + ZEROS_AHEAD).min(WAL_SIZE_LIMIT as u64);
                    if let Err(error) = zeros_ahead(&wal_path, &lock, wanted, &stop) {
                        tracing::debug!(%error, "writing zeros ahead of the write-ahead log failed");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "checkpoint failed"),
        }
    }
}

/// Writes zeros from the end of the log file up to `wanted` bytes, [`ZEROS_PIECE`] at a
/// time under the [`WalLock`] (so SQLite is not writing the log meanwhile: its frames all
/// end before the file's end), each piece synced before the writer goes on. A file already
/// that long (the log started over inside it) needs nothing. The file is not created: the
/// writer's connection makes it.
fn zeros_ahead(
    wal_path: &str,
    lock: &WalLock,
    wanted: u64,
    stop: &std::sync::mpsc::Receiver<()>,
) -> std::io::Result<()> {
    // Appending: each piece goes where the file ends.
    let mut file: File = match OpenOptions::new().append(true).open(wal_path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let zeros = vec![0u8; ZEROS_PIECE];
    loop {
        {
            let _writing = hold(lock);
            let len = file.metadata()?.len();
            if len >= wanted {
                return Ok(());
            }
            let piece = usize::try_from(wanted - len).map_or(ZEROS_PIECE, |n| n.min(ZEROS_PIECE));
            file.write_all(&zeros[..piece])?;
            file.sync_data()?;
        }
        // Lets the writer take the lock between two pieces, and a dropped store stop.
        if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
            stop.recv_timeout(Duration::from_millis(1))
        {
            return Ok(());
        }
    }
}
