//! The write-ahead log's upkeep: its file filled with zeros when the store opens, and
//! checkpoints on a thread of their own.
//!
//! A commit that makes the log file longer pays for its new length as well as its frames:
//! on ext4 here a sync that extended a file took 268-374 µs, one that overwrote written
//! blocks 181-209 µs. A fresh log (every start of Durin after a clean stop, which deletes
//! it) would grow with each commit until it first starts over. So the store writes zeros up
//! to the log's size limit when it opens, before its writer commits anything, as
//! PostgreSQL fills its WAL segments ahead: every later commit overwrites written blocks.
//! Zeros are never a valid frame (a frame carries the log's salt and a checksum), so a
//! recovery stops where the log's real frames end; a log of zeros alone has no valid
//! header and reads as empty.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

/// How often the write-ahead log is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// The length of the write-ahead log (in frames of a 4 KiB page: 34 MB) past which the
/// writer restarts it: half of the zeros, so that the log, checked every
/// [`CHECKPOINT_EVERY`], starts over before it outgrows them (at up to about 60 MB of log a
/// second; order3 wrote about 25-40 MB/s here). At 16,384 frames, past the zeros'
/// end, the log grew to 81 MB before each restart and was cut back to the limit.
const WAL_RESTART_FRAMES: i64 = 8 * 1024;
/// The size the write-ahead log is truncated to when it starts over, and filled to with
/// zeros when the store opens.
pub(super) const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// The zeros written at once.
const ZEROS_PIECE: usize = 1024 * 1024;

/// Fills the log file at `wal_path` with zeros from its end up to [`WAL_SIZE_LIMIT`] and
/// syncs them; a log that long already (after a crash, or a restart inside it) is left as
/// it is. Called before the writer starts, so nothing else writes the file meanwhile. When
/// the zeros cannot all be written (a full disk), the file is cut back to its length and
/// the log grows with its commits instead.
pub(super) fn fill_with_zeros(wal_path: &str) -> std::io::Result<()> {
    let mut file = match OpenOptions::new().append(true).open(wal_path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let length = file.metadata()?.len();
    let wanted = WAL_SIZE_LIMIT as u64;
    if length >= wanted {
        return Ok(());
    }
    if let Err(error) = append_zeros(&mut file, wanted - length) {
        file.set_len(length)?;
        return Err(error);
    }
    Ok(())
}

/// Appends `count` zero bytes to `file`, [`ZEROS_PIECE`] at a time, and syncs them.
fn append_zeros(file: &mut File, count: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; ZEROS_PIECE];
    let mut left = count;
    while left > 0 {
        let piece = usize::try_from(left).map_or(ZEROS_PIECE, |n| n.min(ZEROS_PIECE));
        file.write_all(&zeros[..piece])?;
        left -= piece as u64;
    }
    file.sync_data()
}

/// Copies the write-ahead log into the database file every [`CHECKPOINT_EVERY`], without
/// blocking the writer (`PASSIVE`), until the store is dropped. Under a steady stream of
/// writes a passive checkpoint never catches up with the end of the log, so the log could
/// not start over and would grow without bound (1.5 GB for 100,000 workflows started in a
/// burst); past [`WAL_RESTART_FRAMES`] it asks the writer to restart the log.
pub(super) fn checkpoint_loop(
    conn: Connection,
    stop: std::sync::mpsc::Receiver<()>,
    restart: Arc<AtomicBool>,
) {
    // The first pass waits its interval: a start (a recovery) has the writer to itself
    // meanwhile.
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        // (busy, frames in the log, frames copied into the database)
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(1)
        }) {
            Ok(frames) if frames > WAL_RESTART_FRAMES => restart.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "checkpoint failed"),
        }
    }
}
