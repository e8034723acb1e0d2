import XCTest
import KVCore
import KVTransfer
@testable import KVSystem

/// The etcd client's parsing: endpoints, HTTP answers (Content-Length and chunked), range
/// answers, all refused cleanly when malformed.
final class EtcdTests: XCTestCase {
    func testEndpoints() throws {
        let e = try EtcdClient.parseEndpoints("http://127.0.0.1:2379,127.0.0.2,localhost:3000/")
        XCTAssertEqual(e.map(\.host), ["127.0.0.1", "127.0.0.2", "localhost"])
        XCTAssertEqual(e.map(\.port), [2379, 2379, 3000])
        for bad in [
            "", "https://127.0.0.1:2379", "127.0.0.1:2379/x", "host:2379", "127.0.0.1:0", "127.0.0.1:99999", ",",
            Array(repeating: "127.0.0.1", count: 17).joined(separator: ",")
        ] {
            XCTAssertThrowsError(try EtcdClient.parseEndpoints(Substring(bad)), bad) { e in
                XCTAssertEqual((e as? KVError)?.code, .invalidArgument, bad)
            }
        }
    }

    func testHTTPResponses() throws {
        let plain = Array("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}".utf8)
        XCTAssertEqual(try HTTPResponse.parse(plain), HTTPResponse(status: 200, body: Array("{}".utf8)))
        XCTAssertNil(try HTTPResponse.parse(Array(plain.dropLast()))) // not all here yet
        let chunked = Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n".utf8)
        XCTAssertEqual(try HTTPResponse.parse(chunked)?.body, Array("{\"a\":1}".utf8))
        XCTAssertNil(try HTTPResponse.parse(Array(chunked.prefix(50))))
        XCTAssertEqual(try HTTPResponse.parse(Array("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".utf8))?.status, 400)
        for bad in [
            "SSH-2.0\r\n\r\n", "HTTP/1.1 abc OK\r\n\r\n", "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n{}", "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n123456789\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz"
        ] {
            XCTAssertThrowsError(try HTTPResponse.parse(Array(bad.utf8)), bad)
        }
        XCTAssertThrowsError(try HTTPResponse.parse([UInt8](repeating: 65, count: 17 << 10))) // endless headers
    }

    func testRangeAnswers() throws {
        func kv(_ text: String) throws -> EtcdKeyValue? { try EtcdClient.firstKeyValue(try JSONValue.parse(Array(text.utf8))) }
        let k = try kv(#"{"kvs":[{"key":"eA==","create_revision":"7","mod_revision":"9","value":"eQ==","lease":"42"}]}"#)
        XCTAssertEqual(k, EtcdKeyValue(key: [0x78], value: [0x79], createRevision: 7, modRevision: 9, lease: 42))
        XCTAssertEqual(try kv(#"{"kvs":[{"key":"eA==","create_revision":"7","mod_revision":"7"}]}"#)?.value, [])
        XCTAssertNil(try kv(#"{"header":{}}"#))
        XCTAssertNil(try kv(#"{"kvs":[]}"#))
        for bad in [
            #"{"kvs":{}}"#, #"{"kvs":[{"key":"eA==","create_revision":"0","mod_revision":"7"}]}"#,
            #"{"kvs":[{"key":"eA==","create_revision":"8","mod_revision":"7"}]}"#,
            #"{"kvs":[{"key":"***","create_revision":"7","mod_revision":"7"}]}"#,
            #"{"kvs":[{"key":"eA==","create_revision":"7","mod_revision":"7","value":5}]}"#,
            #"{"kvs":[{"key":"eA==","create_revision":"7","mod_revision":"7","lease":"x"}]}"#
        ] {
            XCTAssertThrowsError(try kv(bad), bad)
        }
    }

    func testUnreachableEtcdFailsFastWithTransfer() throws {
        let c = try EtcdClient(endpoints: "127.0.0.1:1,127.0.0.1:2", timeout: 0.5)
        XCTAssertThrowsError(try c.get(Array("k".utf8))) { e in XCTAssertEqual((e as? KVError)?.code, .transfer) }
        XCTAssertThrowsError(try EtcdClient(endpoints: "127.0.0.1:1", timeout: 0))
    }

    func testClusterNames() {
        XCTAssertNoThrow(try MasterElectionKey.validate(cluster: "prod-1.a_b"))
        for bad in ["", "a/b", "a b", String(repeating: "x", count: 65), "é"] {
            XCTAssertThrowsError(try MasterElectionKey.validate(cluster: bad), bad)
        }
        XCTAssertEqual(MasterElectionKey.leader(cluster: "c"), Array("/kvstore/c/leader".utf8))
    }
}
