/* Frees what it must not, as told by argv[1]: the allocator must stop it
 * with a diagnostic. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "invalid";
    char *p = malloc(32);
    if (!strcmp(mode, "double")) {
        free(p);
        free(p);
    } else if (!strcmp(mode, "offset")) {
        free(p + 8);
    } else {
        int on_stack;
        free(&on_stack);
    }
    puts("survived");
    return 0;
}
