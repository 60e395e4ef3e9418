/* The executable's entry for guest.c (the functions are reached from main so nothing is dropped). */
#include <stdint.h>
void guest_halt(void);
uint64_t guest_outb(uint64_t);
uint64_t guest_rdmsr(void);
void guest_fatal(void);
void guest_unknown(void);
uint64_t guest_mapgpa(void);
int guest_map_retry(uint64_t);
void guest_one_path(void);
void guest_callee_pick(void);
int main(int argc, char **argv)
{
    (void)argv;
    guest_halt();
    guest_fatal();
    guest_unknown();
    guest_one_path();
    guest_callee_pick();
    return (int)(guest_outb((uint64_t)argc) + guest_rdmsr() + guest_mapgpa()) + guest_map_retry(0x4000);
}
