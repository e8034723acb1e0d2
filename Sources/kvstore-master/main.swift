#if canImport(Glibc)
import Glibc
#endif
import KVMaster

// `kvstore-master`: the standalone network master (docs/architecture.md §2). Its flags are
// defined once, in `MasterCommandLine`, shared with `kvstore master`.
exit(MasterCommandLine.main(Array(CommandLine.arguments.dropFirst()), program: "kvstore-master"))
