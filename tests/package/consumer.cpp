// The one program every consumer project builds (find_package, add_subdirectory,
// FetchContent, pkg-config): it uses dynup the way an application would — parse a peer
// list, publish it, read it back — and exits non-zero if anything is off.
#include <dynup/dynup.hpp>

#include <cstdio>
#include <cstring>

#ifndef DYNUP_CONSUMER
#define DYNUP_CONSUMER "pkg-config"
#endif

static int fail(const char* what) {
  std::fprintf(stderr, "%s consumer: %s\n", DYNUP_CONSUMER, what);
  return 1;
}

int main() {
#ifdef EXPECTED_DYNUP_VERSION
  // The headers found must be the version the CMake package (or .pc file) reported.
  if (std::strcmp(dynup::version_string, EXPECTED_DYNUP_VERSION) != 0)
    return fail("header version differs from the package version");
#endif
  auto set = dynup::parse_peer_set(
      R"({"peers":["10.0.0.1:8080",{"host":"10.0.0.2","port":8080,"weight":3}]})");
  if (!set) return fail(set.error().message().c_str());

  dynup::Publisher publisher;
  dynup::PeerSet copy = set.value();
  auto first = publisher.publish(std::move(set).value());
  if (!first.published || first.version != 1) return fail("first publish did not make version 1");
  if (publisher.publish(std::move(copy)).published) return fail("same content was published twice");

  const dynup::Snapshot& current = publisher.snapshot();
  const dynup::Peer* weighted = current->find("10.0.0.2:8080");
  if (current->size() != 2 || weighted == nullptr || weighted->weight != 3)
    return fail("snapshot does not hold the parsed peers");

  auto bad = dynup::parse_peer_set("{\"peers\": [");
  if (bad || bad.error().code() != dynup::Errc::parse_error)
    return fail("truncated JSON was not a parse_error");

  std::printf("dynup %s: published %zu peers as version %llu\n", dynup::version_string,
              current->size(), static_cast<unsigned long long>(current->version()));
  return 0;
}
