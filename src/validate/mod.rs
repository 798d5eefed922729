//! Checks a row must pass before it is sent; a failure names the field and the rule, and
//! the row becomes `rejected` with that text.

pub mod invisible;
pub mod rebill;
pub mod title;
pub mod uscc;

/// Why a row can never be sent as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Rejection {
    /// The column / protocol field at fault (`orderno`, `GMF_NSRSBH`, …).
    pub field: &'static str,
    /// What is wrong, with the offending value where it is not private.
    pub reason: String,
}

impl Rejection {
    /// A rejection of `field` for `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Rejection {
            field,
            reason: reason.into(),
        }
    }
}
