//! One client per remote API; they build requests and parse answers, never touch the
//! database.

pub mod http;
pub mod sign;
