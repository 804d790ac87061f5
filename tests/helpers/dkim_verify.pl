#!/usr/bin/perl
# Verify the DKIM signatures of a message read from stdin with Perl's Mail::DKIM (what
# SpamAssassin and amavis use), asking the DNS server ARGV[0] port ARGV[1] for keys.
# Prints "signature ALGORITHM RESULT_DETAIL" per signature, then "overall RESULT_DETAIL".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS;

my ($server, $port) = @ARGV;
my $resolver = Net::DNS::Resolver->new(
    nameservers => [$server], port => $port, recurse => 1,
    udp_timeout => 3, tcp_timeout => 3, retry => 2,
);
Mail::DKIM::DNS::resolver($resolver);

binmode STDIN;
my $message = do { local $/; <STDIN> };
$message =~ s/\r?\n/\r\n/g;
my $verifier = Mail::DKIM::Verifier->new();
$verifier->PRINT($message);
$verifier->CLOSE();
foreach my $signature ($verifier->signatures) {
    printf "signature %s %s\n", $signature->algorithm, $signature->result_detail;
}
printf "overall %s\n", $verifier->result_detail;
