//! The two queues' handlers: what "process one row" means for rebilling and for titles.
//! Each validates its row, prepares it, sends it through its client and classifies what
//! came back (`classify.rs` next to each handler holds the queue's built-in rules).

pub mod rebill;
pub mod title;
