complete -c vma-encode -s c -l config -d 'Store a config file: NAME=PATH stores PATH under NAME, a bare PATH under its base name; repeatable, up to 256' -r -F
complete -c vma-encode -s o -l output -d 'Write the archive to ARCHIVE (made safely) instead of standard output (\'-\': standard output)' -r -F
complete -c vma-encode -l uuid -d 'The archive\'s uuid (default: the stream\'s, else random)' -r
complete -c vma-encode -l uuid-from -d 'The archive\'s uuid derived from NAME (the same for every archive made with it, so consecutive archives share their extent headers)' -r
complete -c vma-encode -l base -d 'With \'-\' and an incremental stream (`cbw-tap backup --incremental`): the archive of the backup the stream applies to (plain or zstd, gzip, lzop). The output is a complete archive: each cluster from the stream if it has it, else from BASE (checked as it passes)' -r -F
complete -c vma-encode -l spool-memory -d 'Stream clusters kept in memory by --base and --sorted before they spill to a temporary file (in $TMPDIR), in bytes' -r
complete -c vma-encode -l ctime -d 'The archive\'s creation time in seconds since the epoch (0 or more)' -r
complete -c vma-encode -l force -d 'Replace ARCHIVE if it exists (a regular file)'
complete -c vma-encode -l assume-raw -d 'Take every source as a raw disk, even one that starts like a qcow2, VMDK, … image'
complete -c vma-encode -l sorted -d 'With \'-\': write the clusters in (device, cluster) order (the stream is spooled first, beyond --spool-memory to a temporary file). Images are always written in that order. With --base: a base in another order is read in this one through an index of its extents if it is a plain file; a compressed or piped base must be in this order (written with --sorted). Without --sorted, a merge keeps the base\'s order'
complete -c vma-encode -l no-data-checksums -d 'Write plain extents, without our CRC-32 of each extent\'s data'
complete -c vma-encode -s v -l verbose -d 'Print Proxmox-style progress lines and per-image statistics on stderr'
complete -c vma-encode -l json -d 'Print the statistics of the archive made as one JSON object on one line on stderr, once it is complete (docs/JSON.md)'
complete -c vma-encode -s h -l help -d 'Print help'
complete -c vma-encode -s V -l version -d 'Print version'
