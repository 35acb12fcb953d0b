//! `Archive::unchecked_device`: a device a restore skips (Proxmox's
//! `skip=`) is checked neither for duplicate clusters nor for completeness;
//! every other device still is.

use std::io;

use vma_format::{Archive, Cluster, ClusterSink, Flow, HeaderBuilder, Writer, WriterOptions};

struct Count(Vec<u64>);

impl ClusterSink for Count {
    fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
        self.0[c.dev_id as usize] += 1;
        Ok(Flow::Continue)
    }
}

/// Device 1: 58 full clusters (exactly the first extent); device 2: two
/// clusters (the second extent). Returns the archive and where the second
/// extent starts.
fn archive() -> (Vec<u8>, usize) {
    let mut h = HeaderBuilder::new([4; 16], 0);
    h.add_device("drive-scsi0", 58 * 65536).unwrap();
    h.add_device("drive-ide0", 2 * 65536).unwrap();
    let mut w = Writer::new(
        Vec::new(),
        &h,
        WriterOptions {
            data_checksums: false,
        },
    )
    .unwrap();
    for n in 0..58 {
        w.write_raw(1, n, &[n as u8 + 1; 65536]).unwrap();
    }
    for n in 0..2 {
        w.write_raw(2, n, &[9; 65536]).unwrap();
    }
    let bytes = w.finish().unwrap();
    let second = bytes.len() - (512 + 2 * 65536);
    (bytes, second)
}

fn read(bytes: &[u8], unchecked: Option<u8>) -> Result<Vec<u64>, String> {
    let mut a = Archive::new(bytes).map_err(|e| e.to_string())?;
    if let Some(id) = unchecked {
        a.unchecked_device(id);
    }
    let mut count = Count(vec![0; 256]);
    a.run(&mut count).map_err(|e| e.to_string())?;
    Ok(count.0[1..3].to_vec())
}

#[test]
fn a_skipped_device_may_repeat_or_lack_clusters() {
    let (bytes, second) = archive();
    assert_eq!(read(&bytes, None), Ok(vec![58, 2]));

    // Device 2's extent twice.
    let mut dup = bytes.clone();
    dup.extend_from_slice(&bytes[second..]);
    assert!(read(&dup, None)
        .unwrap_err()
        .ends_with("cluster 0 of drive-ide0 appears twice"));
    assert_eq!(read(&dup, Some(2)), Ok(vec![58, 4]));

    // Device 2's extent missing.
    let cut = &bytes[..second];
    assert_eq!(
        read(cut, None).unwrap_err(),
        "drive-ide0: cluster 0 missing (2 of 2 clusters missing)"
    );
    assert_eq!(read(cut, Some(2)), Ok(vec![58, 0]));

    // Device 1 is still checked when device 2 is not.
    let header = bytes.len() - (512 + 58 * 65536) - (512 + 2 * 65536);
    let mut dup1 = bytes.clone();
    dup1.extend_from_slice(&bytes[header..second]);
    assert!(read(&dup1, Some(2))
        .unwrap_err()
        .ends_with("cluster 0 of drive-scsi0 appears twice"));
    assert_eq!(
        read(&bytes[..header], Some(2)).unwrap_err(),
        "drive-scsi0: cluster 0 missing (58 of 58 clusters missing)"
    );
}
