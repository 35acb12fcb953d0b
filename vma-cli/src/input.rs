//! Opening inputs: a path, or `-` for standard input.

use std::fs::File;
use std::io::{self, Read};

/// An opened input and the name to use for it in messages.
pub struct Input {
    /// The name: the path as given, or `<stdin>` for `-`.
    pub name: String,
    reader: Box<dyn Read + Send>,
}

impl Input {
    /// Opens `path`; `-` is standard input. Large reads go straight to the
    /// file or pipe: the archive reader does its own buffering.
    pub fn open(path: &str) -> io::Result<Input> {
        if path == "-" {
            return Ok(Input {
                name: "<stdin>".into(),
                reader: Box::new(io::stdin()),
            });
        }
        let file = File::open(path)?;
        if file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        Ok(Input {
            name: path.to_string(),
            reader: Box::new(file),
        })
    }
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}
