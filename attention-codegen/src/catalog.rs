//! TODO(helper): catalog
