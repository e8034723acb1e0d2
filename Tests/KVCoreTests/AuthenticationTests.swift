import XCTest
@testable import KVCore

/// SHA-256 and HMAC-SHA256 against published test vectors (FIPS 180-4 examples, RFC 4231),
/// and the handshake's proofs.
final class AuthenticationTests: XCTestCase {
    func hex(_ b: [UInt8]) -> String { b.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }
    func bytes(_ hex: String) -> [UInt8] {
        var out: [UInt8] = []
        var i = hex.startIndex
        while i < hex.endIndex {
            let j = hex.index(i, offsetBy: 2)
            out.append(UInt8(hex[i..<j], radix: 16)!)
            i = j
        }
        return out
    }

    func testSHA256Vectors() {
        XCTAssertEqual(hex(SHA256.hash([])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(hex(SHA256.hash(Array("abc".utf8))), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(
            hex(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        // One million 'a', fed in uneven pieces.
        var s = SHA256()
        var left = 1_000_000
        var piece = 1
        while left > 0 {
            let n = min(piece, left)
            s.update([UInt8](repeating: 0x61, count: n))
            left -= n
            piece = piece * 3 % 1009 + 1
        }
        XCTAssertEqual(hex(s.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    func testHMACSHA256VectorsOfRFC4231() {
        // Test case 1
        XCTAssertEqual(
            hex(HMACSHA256.mac(key: [UInt8](repeating: 0x0b, count: 20), message: Array("Hi There".utf8))),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        // Test case 2
        XCTAssertEqual(
            hex(HMACSHA256.mac(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8))),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        // Test case 3
        XCTAssertEqual(
            hex(HMACSHA256.mac(key: [UInt8](repeating: 0xaa, count: 20), message: [UInt8](repeating: 0xdd, count: 50))),
            "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe")
        // Test case 6: a key longer than the block is hashed first
        XCTAssertEqual(
            hex(
                HMACSHA256.mac(
                    key: [UInt8](repeating: 0xaa, count: 131),
                    message: Array("Test Using Larger Than Block-Size Key - Hash Key First".utf8))),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
        // Test case 7
        XCTAssertEqual(
            hex(
                HMACSHA256.mac(
                    key: [UInt8](repeating: 0xaa, count: 131),
                    message: Array(
                        "This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm."
                            .utf8))),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2")
    }

    func testProofsDependOnTokenRoleAndBothNonces() {
        let t = Array("token".utf8), cn = [UInt8](repeating: 1, count: 32), sn = [UInt8](repeating: 2, count: 32)
        let p = Authentication.proof(token: t, role: .client, clientNonce: cn, serverNonce: sn)
        XCTAssertEqual(p.count, Authentication.proofSize)
        XCTAssertNotEqual(p, Authentication.proof(token: t, role: .server, clientNonce: cn, serverNonce: sn))
        XCTAssertNotEqual(p, Authentication.proof(token: Array("tokeN".utf8), role: .client, clientNonce: cn, serverNonce: sn))
        XCTAssertNotEqual(p, Authentication.proof(token: t, role: .client, clientNonce: sn, serverNonce: cn))
        XCTAssertTrue(Authentication.constantTimeEqual(p, p))
        XCTAssertFalse(Authentication.constantTimeEqual(p, Array(p.dropLast())))
        XCTAssertFalse(Authentication.constantTimeEqual(p, p.map { $0 ^ 1 }))
        XCTAssertEqual(Authentication.newToken().count, 64)
        XCTAssertNotEqual(Authentication.newToken(), Authentication.newToken())
    }
}
