//! Checks a row must pass before it is sent; a failure names the field and the rule.
