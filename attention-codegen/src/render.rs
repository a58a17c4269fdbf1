//! TODO(helper): render
