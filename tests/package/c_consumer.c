/* The C consumer project's program: links libdynup_c through the installed CMake
 * package and calls it as a C program would. Exits non-zero if anything is off. */
#include <dynup/c/dynup.h>

#include <stdio.h>
#include <string.h>

static int fail(const char* what) {
  fprintf(stderr, "C consumer: %s\n", what);
  return 1;
}

int main(void) {
  char err[256];
  dynup_upstream* up;
  if (strcmp(dynup_version(), EXPECTED_DYNUP_VERSION) != 0) return fail("library version differs from the package's");
  if (dynup_abi_version() != DYNUP_C_ABI_VERSION) return fail("library ABI differs from the header's");
  if (dynup_selection_size() != sizeof(dynup_selection)) return fail("dynup_selection differs in size");
  up = dynup_upstream_new("{\"name\":\"api\",\"source\":\"file:///nonexistent/peers.json\",\"watch\":{\"wait_ms\":5}}",
                          err, sizeof err);
  if (up != NULL) return fail("a bad config was accepted");
  if (strcmp(err, "upstream.watch.wait_ms: expected an integer 10..600000, got 5") != 0) return fail(err);
  printf("dynup_c %s, C ABI %d: config errors name their path (%s)\n", dynup_version(), dynup_abi_version(), err);
  return 0;
}
