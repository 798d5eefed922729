//! The two queues' handlers: what "process one row" means for rebilling and for titles.
//! Each validates its row, prepares it and sends it through its client.

pub mod rebill;
pub mod title;
